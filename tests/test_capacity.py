"""Machine readings: cgroup bounds, GPUs from NVML and amdgpu sysfs, test overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor_app import capacity
from supervisor_app.capacity import ENV_OVERRIDES, read_capacity

GiB = 1024**3
MiB = 1024**2
HOST_RAM = SimpleNamespace(available=32 * GiB, total=64 * GiB)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake host: 32 GiB available, 8 CPUs, no NVML; fresh log-once memory per test."""
    monkeypatch.delenv(ENV_OVERRIDES, raising=False)
    monkeypatch.setattr(capacity, "_logged", set())
    monkeypatch.setattr(capacity, "_nvml", capacity._Nvml(importer=_nvml_not_installed))
    monkeypatch.setattr(capacity.psutil, "virtual_memory", lambda: HOST_RAM)
    monkeypatch.setattr(capacity.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def _nvml_not_installed() -> Any:
    raise ImportError("No module named 'pynvml'")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read(tmp_path: Path, **kw: Any) -> capacity.Readings:
    return read_capacity(sys_root=tmp_path / "sys", proc_root=tmp_path / "proc", **kw)


# --- overrides -----------------------------------------------------------------------------


def test_override_argument_replaces_readings_and_accepts_units(tmp_path: Path) -> None:
    r = read(
        tmp_path,
        overrides={"memory_available": "1GiB", "cpu_count": 3, "gpu_free": ["2GiB", 1024]},
    )
    assert r.memory_available == GiB
    assert r.memory_total == HOST_RAM.total  # not overridden: still measured
    assert r.cpu_count == 3
    assert [(g.index, g.free_bytes, g.vendor) for g in r.gpus] == [
        (0, 2 * GiB, "override"),
        (1, 1024, "override"),
    ]
    assert r.gpu_free == 2 * GiB + 1024
    assert r.source["memory_available"] == "override"
    assert r.source["memory_total"] == "psutil"
    assert r.source["gpus"] == "override"


def test_empty_gpu_override_means_no_gpu_without_probing(tmp_path: Path) -> None:
    probed = []
    capacity._nvml = capacity._Nvml(importer=lambda: probed.append(1))
    r = read(tmp_path, overrides={"gpu_free": []})
    assert r.gpus == [] and r.gpu_free == 0
    assert probed == []


@pytest.mark.parametrize(
    "bad",
    [{"memory": "1GiB"}, {"memory_available": "lots"}, {"cpu_count": 0}, {"gpu_free": "1GiB"}],
)
def test_bad_override_argument_is_a_value_error(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        read(tmp_path, overrides=bad)


def test_override_file_is_reread_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "caps.yaml", "memory_available: 4GiB\ngpu_free: [8GiB]\n")
    monkeypatch.setenv(ENV_OVERRIDES, str(path))
    first = read(tmp_path)
    assert (first.memory_available, first.gpu_free) == (4 * GiB, 8 * GiB)

    write(path, "memory_available: 1GiB\ngpu_free: []\n")
    second = read(tmp_path)
    assert (second.memory_available, second.gpus) == (GiB, [])


def test_override_file_may_be_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "caps.json", json.dumps({"cpu_count": 2, "gpu_free": [1024]}))
    monkeypatch.setenv(ENV_OVERRIDES, str(path))
    r = read(tmp_path)
    assert r.cpu_count == 2 and r.gpu_free == 1024


def test_broken_override_file_falls_back_to_measuring_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "caps.yaml", "memory_available: [unclosed\n")
    monkeypatch.setenv(ENV_OVERRIDES, str(path))
    with caplog.at_level(logging.WARNING, logger="jobvisor.capacity"):
        for _ in range(3):
            r = read(tmp_path)
    assert r.memory_available == HOST_RAM.available
    warnings = [rec for rec in caplog.records if "overrides" in rec.getMessage()]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()


# --- cgroups -----------------------------------------------------------------------------


def cgroup_v2(tmp_path: Path, rel: str = "", **files: str) -> Path:
    root = tmp_path / "sys" / "fs" / "cgroup"
    write(root / "cgroup.controllers", "cpu memory\n")
    d = root / rel if rel else root
    for name, text in files.items():
        write(d / name.replace("_", ".", 1), text)
    return d


def test_cgroup_v2_limit_bounds_available_memory(tmp_path: Path) -> None:
    cgroup_v2(
        tmp_path,
        memory_max=f"{GiB}\n",
        memory_current=f"{256 * MiB}\n",
        memory_stat=f"anon {128 * MiB}\ninactive_file {64 * MiB}\nactive_file 1\n",
    )
    r = read(tmp_path)
    # Inactive page cache is reclaimable, so it does not count as used.
    assert r.memory_available == GiB - (256 - 64) * MiB
    assert r.memory_total == GiB
    assert r.source["memory_available"].startswith("cgroup v2")


def test_cgroup_v2_without_limit_uses_psutil(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, memory_max="max\n", memory_current=f"{GiB}\n")
    r = read(tmp_path)
    assert (r.memory_available, r.memory_total) == (HOST_RAM.available, HOST_RAM.total)
    assert r.source["memory_available"] == "psutil"


def test_cgroup_headroom_above_host_available_does_not_raise_it(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, memory_max=f"{128 * GiB}\n", memory_current="0\n")
    assert read(tmp_path).memory_available == HOST_RAM.available


def test_cgroup_v2_over_limit_reads_zero_not_negative(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, memory_max=f"{GiB}\n", memory_current=f"{2 * GiB}\n")
    assert read(tmp_path).memory_available == 0


def test_cgroup_v2_tightest_ancestor_limit_applies(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "self" / "cgroup", "0::/jobs/jobvisor\n")
    cgroup_v2(tmp_path, "jobs/jobvisor", memory_max=f"{8 * GiB}\n", memory_current="0\n")
    cgroup_v2(tmp_path, "jobs", memory_max=f"{2 * GiB}\n", memory_current=f"{GiB}\n")
    r = read(tmp_path)
    assert r.memory_available == GiB
    assert r.memory_total == 2 * GiB
    assert r.source["memory_available"].endswith("jobs")


def test_cgroup_v2_cpu_quota_rounds_up_and_bounds_affinity(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, cpu_max="150000 100000\n")
    r = read(tmp_path)
    assert r.cpu_count == 2
    assert r.source["cpu_count"].startswith("cgroup v2")


def test_cgroup_v2_unlimited_cpu_uses_affinity(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, cpu_max="max 100000\n")
    r = read(tmp_path)
    assert r.cpu_count == 8 and r.source["cpu_count"] == "affinity"


def test_cgroup_v1_limit_and_cpu_quota(tmp_path: Path) -> None:
    mem = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    write(mem / "memory.limit_in_bytes", f"{4 * GiB}\n")
    write(mem / "memory.usage_in_bytes", f"{3 * GiB}\n")
    write(mem / "memory.stat", f"cache 5\ntotal_inactive_file {512 * MiB}\n")
    cpu = tmp_path / "sys" / "fs" / "cgroup" / "cpu,cpuacct"
    write(cpu / "cpu.cfs_quota_us", "300000\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    r = read(tmp_path)
    assert r.memory_available == 4 * GiB - (3 * GiB - 512 * MiB)
    assert r.memory_total == 4 * GiB
    assert r.cpu_count == 3
    assert r.source["memory_available"].startswith("cgroup v1")


def test_cgroup_v1_unlimited_values_mean_no_bound(tmp_path: Path) -> None:
    mem = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    write(mem / "memory.limit_in_bytes", "9223372036854771712\n")
    write(mem / "memory.usage_in_bytes", f"{GiB}\n")
    cpu = tmp_path / "sys" / "fs" / "cgroup" / "cpu"
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    r = read(tmp_path)
    assert r.memory_available == HOST_RAM.available
    assert r.cpu_count == 8


def test_no_cgroup_tree_uses_host_readings(tmp_path: Path) -> None:
    r = read(tmp_path)
    assert (r.memory_available, r.memory_total, r.cpu_count) == (32 * GiB, 64 * GiB, 8)


# --- AMD ---------------------------------------------------------------------------------


def amd_card(tmp_path: Path, n: int, total: int, used: int, name: str | None = None) -> None:
    device = tmp_path / "sys" / "class" / "drm" / f"card{n}" / "device"
    write(device / "mem_info_vram_total", f"{total}\n")
    write(device / "mem_info_vram_used", f"{used}\n")
    if name:
        write(device / "product_name", f"{name}\n")


def test_amd_sysfs_vram_gives_free_memory_per_card(tmp_path: Path) -> None:
    amd_card(tmp_path, 1, 16 * GiB, 4 * GiB, name="Radeon PRO W7800")
    amd_card(tmp_path, 0, 8 * GiB, 8 * GiB)
    drm = tmp_path / "sys" / "class" / "drm"
    (drm / "card0-DP-1").mkdir()  # a connector, not a GPU
    write(drm / "card2" / "device" / "vendor", "0x8086\n")  # no amdgpu VRAM files
    r = read(tmp_path)
    assert [(g.index, g.vendor, g.total_bytes, g.free_bytes) for g in r.gpus] == [
        (0, "amd", 8 * GiB, 0),
        (1, "amd", 16 * GiB, 12 * GiB),
    ]
    assert r.gpus[1].name == "Radeon PRO W7800"
    assert r.gpus[0].name == "AMD GPU"
    assert r.source["gpus"] == "amd"


# --- NVML --------------------------------------------------------------------------------


class FakeNvml:
    """The few pynvml calls we use, with two GPUs; one may be made unreadable."""

    def __init__(self, broken_index: int | None = None, init_error: Exception | None = None):
        self.init_calls = 0
        self.broken_index = broken_index
        self.init_error = init_error

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i == self.broken_index:
            raise RuntimeError("GPU is lost")
        return i

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * GiB, free=(70 - handle * 10) * GiB, used=0)

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return b"NVIDIA H100" if handle == 0 else "NVIDIA H200"


def test_nvml_reports_each_gpu_and_initialises_once(tmp_path: Path) -> None:
    fake = FakeNvml()
    capacity._nvml = capacity._Nvml(importer=lambda: fake)
    for _ in range(3):
        r = read(tmp_path)
    assert [(g.index, g.name, g.vendor, g.free_bytes) for g in r.gpus] == [
        (0, "NVIDIA H100", "nvidia", 70 * GiB),
        (1, "NVIDIA H200", "nvidia", 60 * GiB),
    ]
    assert fake.init_calls == 1
    assert r.source["gpus"] == "nvidia"


def test_nvml_missing_means_no_gpu_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="jobvisor.capacity"):
        readings = [read(tmp_path) for _ in range(3)]
    assert all(r.gpus == [] for r in readings)
    assert readings[-1].source["gpus"] == "none"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "jobvisor.capacity"]
    assert len(lines) == 1
    assert "NVML unavailable" in lines[0] and "\n" not in lines[0]


def test_nvml_init_failure_means_no_gpu_and_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml(init_error=RuntimeError("Driver Not Loaded"))
    capacity._nvml = capacity._Nvml(importer=lambda: fake)
    with caplog.at_level(logging.INFO, logger="jobvisor.capacity"):
        assert read(tmp_path).gpus == []
        assert read(tmp_path).gpus == []
    assert fake.init_calls == 1
    assert len(caplog.records) == 1
    assert "Driver Not Loaded" in caplog.records[0].getMessage()


def test_one_unreadable_nvidia_gpu_does_not_hide_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capacity._nvml = capacity._Nvml(importer=lambda: FakeNvml(broken_index=0))
    with caplog.at_level(logging.WARNING, logger="jobvisor.capacity"):
        r1, r2 = read(tmp_path), read(tmp_path)
    assert [g.index for g in r1.gpus] == [g.index for g in r2.gpus] == [1]
    assert len(caplog.records) == 1


def test_nvidia_and_amd_gpus_are_both_reported(tmp_path: Path) -> None:
    capacity._nvml = capacity._Nvml(importer=lambda: FakeNvml())
    amd_card(tmp_path, 0, 16 * GiB, 0)
    r = read(tmp_path)
    assert [g.vendor for g in r.gpus] == ["nvidia", "nvidia", "amd"]
    assert r.source["gpus"] == "amd, nvidia"


def test_real_machine_reading_is_plausible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # no fakes: whatever this host is, the reading must be usable
    r = read_capacity(overrides={"gpu_free": []})
    assert r.memory_total > 0
    assert 0 <= r.memory_available <= r.memory_total
    assert r.cpu_count >= 1
