"""What the machine has to offer right now: RAM, CPUs, GPU memory.

RAM is psutil's "available", bounded by the cgroup memory limit when we run inside one
(a container sees the host's RAM in /proc/meminfo but gets OOM-killed at its limit).
CPUs are the affinity mask, bounded by a cgroup CPU quota. GPUs come from NVML
(nvidia-ml-py, imported lazily) and from amdgpu's sysfs files. A missing or broken GPU
library means "no GPU" and one log line per process, never an exception: a CPU-only
host is a normal host.

Every reading can be overridden for tests, either through the ``overrides`` argument or
through a JSON/YAML file named by ``$JOBVISOR_CAPACITY_OVERRIDES``, re-read on every
call so a test can change the machine under a running supervisor (write it atomically:
write a temp file, then rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from supervisor_app.model_servers import ModelServerReading
from supervisor_app.units import parse_bytes

log = logging.getLogger("jobvisor.capacity")

ENV_OVERRIDES = "JOBVISOR_CAPACITY_OVERRIDES"
OVERRIDE_KEYS = frozenset({"memory_available", "memory_total", "cpu_count", "gpu_free"})

# cgroup v1 reports "no limit" as a page-aligned LONG_MAX; anything this large is unlimited.
_UNLIMITED = 1 << 60


@dataclass
class GpuReading:
    index: int
    name: str
    vendor: str  # "nvidia", "amd" or "override"
    total_bytes: int
    free_bytes: int


@dataclass
class Readings:
    memory_available: int
    memory_total: int
    cpu_count: int
    gpus: list[GpuReading] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)  # reading -> where it came from
    # Model servers on our GPUs (model_servers.py); the supervisor adds them after
    # read_capacity, which itself does no network I/O.
    model_servers: list[ModelServerReading] = field(default_factory=list)

    @property
    def gpu_free(self) -> int:
        return sum(g.free_bytes for g in self.gpus)

    @property
    def model_memory_held(self) -> int:
        """GPU memory the servers' loaded models hold (already not free), where known."""
        return sum(s.held_bytes or 0 for s in self.model_servers)

    @property
    def model_memory_reserved(self) -> int:
        """GPU memory to keep for models the servers unloaded and will load again."""
        return sum(s.reserved_bytes for s in self.model_servers)


def read_capacity(
    overrides: Mapping[str, Any] | None = None,
    *,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
) -> Readings:
    """Measure the machine now. ``overrides`` (or the $JOBVISOR_CAPACITY_OVERRIDES file)
    replaces individual readings; ``sys_root``/``proc_root`` let tests supply fake trees."""
    if overrides is None:
        overrides = _overrides_from_env()
    else:
        overrides = _validate_overrides(overrides, "overrides argument")

    source: dict[str, str] = {}
    cgroup = _find_cgroup(sys_root, proc_root)

    vm = None
    if "memory_available" not in overrides or "memory_total" not in overrides:
        vm = psutil.virtual_memory()
    if "memory_available" in overrides:
        memory_available = overrides["memory_available"]
        source["memory_available"] = "override"
    else:
        memory_available, source["memory_available"] = _bounded_available(vm.available, cgroup)
    if "memory_total" in overrides:
        memory_total = overrides["memory_total"]
        source["memory_total"] = "override"
    else:
        memory_total, source["memory_total"] = _bounded_total(vm.total, cgroup)

    if "cpu_count" in overrides:
        cpu_count = overrides["cpu_count"]
        source["cpu_count"] = "override"
    else:
        cpu_count, source["cpu_count"] = _cpu_count(cgroup)

    if "gpu_free" in overrides:
        gpus = [
            GpuReading(index=i, name="override", vendor="override", total_bytes=b, free_bytes=b)
            for i, b in enumerate(overrides["gpu_free"])
        ]
        source["gpus"] = "override"
    else:
        gpus = _nvidia_gpus() + _amd_gpus(sys_root)
        vendors = sorted({g.vendor for g in gpus})
        source["gpus"] = ", ".join(vendors) if vendors else "none"

    return Readings(
        memory_available=memory_available,
        memory_total=memory_total,
        cpu_count=cpu_count,
        gpus=gpus,
        source=source,
    )


# --- overrides ---------------------------------------------------------------------------


def _validate_overrides(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - OVERRIDE_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
            f"(allowed: {', '.join(sorted(OVERRIDE_KEYS))})"
        )
    out: dict[str, Any] = {}
    for key in ("memory_available", "memory_total"):
        if raw.get(key) is not None:
            out[key] = parse_bytes(raw[key])
    if raw.get("cpu_count") is not None:
        cpus = raw["cpu_count"]
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"{where}: cpu_count must be a positive integer, got {cpus!r}")
        out["cpu_count"] = cpus
    if raw.get("gpu_free") is not None:
        gpu_free = raw["gpu_free"]
        if not isinstance(gpu_free, list):
            raise ValueError(f"{where}: gpu_free must be a list (one value per GPU)")
        out["gpu_free"] = [parse_bytes(v) for v in gpu_free]
    return out


def _overrides_from_env() -> dict[str, Any]:
    path = os.environ.get(ENV_OVERRIDES)
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
        # JSON is a subset of YAML, so one parser serves both file kinds.
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        return _validate_overrides(raw or {}, path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        # The supervisor loop must keep running; measure for real this time.
        _log_once(
            f"overrides:{err}", logging.WARNING, "capacity overrides %s ignored: %s", path, err
        )
        return {}


# --- cgroups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cgroup:
    version: int
    memory_dirs: tuple[Path, ...]  # innermost first; every ancestor's limit applies too
    cpu_dirs: tuple[Path, ...]


def _find_cgroup(sys_root: Path, proc_root: Path) -> _Cgroup | None:
    mount = sys_root / "fs" / "cgroup"
    paths = _own_cgroup_paths(proc_root)
    if (mount / "cgroup.controllers").exists():
        dirs = _dirs_up_to(mount, paths.get("", "/"))
        return _Cgroup(2, dirs, dirs)
    if (mount / "memory").is_dir() or (mount / "cpu").is_dir():
        cpu_mount = mount / "cpu" if (mount / "cpu").is_dir() else mount / "cpu,cpuacct"
        return _Cgroup(
            1,
            _dirs_up_to(mount / "memory", paths.get("memory", "/")),
            _dirs_up_to(cpu_mount, paths.get("cpu", "/")),
        )
    return None


def _own_cgroup_paths(proc_root: Path) -> dict[str, str]:
    """Controller -> our cgroup path, from /proc/self/cgroup ("" is the v2 hierarchy)."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _dirs_up_to(mount: Path, cgroup_path: str) -> tuple[Path, ...]:
    # Inside a container with its own cgroup namespace the path in /proc/self/cgroup may
    # not exist under the mount (the mount root *is* our cgroup); then only the root counts.
    here = mount / cgroup_path.strip("/") if cgroup_path.strip("/") else mount
    dirs = []
    while here.is_dir() and (here == mount or mount in here.parents):
        dirs.append(here)
        if here == mount:
            break
        here = here.parent
    return tuple(dirs) if dirs else (mount,)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _memory_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_memory(cgroup: _Cgroup) -> tuple[int, int, Path] | None:
    """(limit, headroom, dir) of the tightest memory limit among our cgroup and ancestors.

    Headroom is limit minus usage, where usage leaves out inactive page cache: the kernel
    reclaims that before it OOM-kills, and psutil's "available" excludes it too. Without
    that, reading a few big PDFs would look like our RAM running out."""
    if cgroup.version == 2:
        limit_file, usage_file, stat_key = "memory.max", "memory.current", "inactive_file"
    else:
        limit_file, usage_file, stat_key = (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    best: tuple[int, int, Path] | None = None
    for d in cgroup.memory_dirs:
        limit = _read_int(d / limit_file)
        if limit is None:
            continue
        usage = _read_int(d / usage_file) or 0
        usage = max(0, usage - _memory_stat(d / "memory.stat", stat_key))
        headroom = max(0, limit - usage)
        if best is None or headroom < best[1]:
            best = (limit, headroom, d)
    return best


def _bounded_available(available: int, cgroup: _Cgroup | None) -> tuple[int, str]:
    mem = _cgroup_memory(cgroup) if cgroup else None
    if mem is not None and mem[1] < available:
        return mem[1], f"cgroup v{cgroup.version} {mem[2]}"
    return available, "psutil"


def _bounded_total(total: int, cgroup: _Cgroup | None) -> tuple[int, str]:
    mem = _cgroup_memory(cgroup) if cgroup else None
    if mem is not None and mem[0] < total:
        return mem[0], f"cgroup v{cgroup.version} {mem[2]}"
    return total, "psutil"


def _cpu_quota(cgroup: _Cgroup) -> tuple[float, Path] | None:
    """Smallest CPU quota (in CPUs) among our cgroup and its ancestors, if any is set."""
    best: tuple[float, Path] | None = None
    for d in cgroup.cpu_dirs:
        if cgroup.version == 2:
            try:
                quota_text, _, period_text = (d / "cpu.max").read_text().strip().partition(" ")
            except OSError:
                continue
            if quota_text == "max":
                continue
            try:
                quota, period = int(quota_text), int(period_text or "100000")
            except ValueError:
                continue
        else:
            quota = _read_int(d / "cpu.cfs_quota_us")
            period = _read_int(d / "cpu.cfs_period_us")
            if quota is None or period is None or quota <= 0:  # -1 = no quota
                continue
        if period <= 0:
            continue
        cpus = quota / period
        if best is None or cpus < best[0]:
            best = (cpus, d)
    return best


def _cpu_count(cgroup: _Cgroup | None) -> tuple[int, str]:
    try:
        count, where = len(os.sched_getaffinity(0)), "affinity"
    except (AttributeError, OSError):  # not on Linux
        count, where = os.cpu_count() or 1, "os.cpu_count"
    quota = _cpu_quota(cgroup) if cgroup else None
    if quota is not None:
        # A 1.5-CPU quota still lets two processes make progress; round up, never below 1.
        limited = max(1, math.ceil(quota[0]))
        if limited < count:
            return limited, f"cgroup v{cgroup.version} {quota[1]}"
    return count, where


# --- GPUs --------------------------------------------------------------------------------

_logged: set[str] = set()


def _log_once(key: str, level: int, msg: str, *args: Any) -> None:
    """Log a condition the first time this process sees it; replans run every few seconds."""
    if key in _logged:
        return
    _logged.add(key)
    log.log(level, msg, *args)


class _Nvml:
    """NVML, initialised once per process and kept: nvmlInit can take a noticeable time
    and we read every few seconds. ``failed`` sticks, since drivers don't appear mid-run."""

    def __init__(self, importer: Callable[[], Any] | None = None) -> None:
        self._importer = importer or _import_pynvml
        self.lib: Any = None
        self.failed = False

    def ready(self) -> Any:
        if self.lib is None and not self.failed:
            try:
                lib = self._importer()
                lib.nvmlInit()
                self.lib = lib
            except Exception as err:  # ImportError, NVMLError_LibraryNotFound, driver errors
                self.failed = True
                _log_once("nvml", logging.INFO, "no NVIDIA GPU: NVML unavailable (%s)", _why(err))
        return self.lib


def _import_pynvml() -> Any:
    import pynvml  # from nvidia-ml-py; lazy so CPU-only hosts never load it

    return pynvml


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


_nvml = _Nvml()


def _nvidia_gpus() -> list[GpuReading]:
    lib = _nvml.ready()
    if lib is None:
        return []
    try:
        count = lib.nvmlDeviceGetCount()
    except Exception as err:
        _log_once("nvml-count", logging.WARNING, "NVML device count failed: %s", _why(err))
        return []
    gpus = []
    for i in range(count):
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(i)
            mem = lib.nvmlDeviceGetMemoryInfo(handle)
            name = lib.nvmlDeviceGetName(handle)
        except Exception as err:
            # A GPU that fell off the bus must not take the others (or us) with it.
            _log_once(f"nvml-{i}", logging.WARNING, "NVML GPU %d unreadable: %s", i, _why(err))
            continue
        if isinstance(name, bytes):  # older nvidia-ml-py returns bytes
            name = name.decode(errors="replace")
        gpus.append(GpuReading(i, str(name), "nvidia", int(mem.total), int(mem.free)))
    return gpus


def gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory each process uses, summed over NVIDIA GPUs (empty without NVML).

    Lets the planner count what our own children hold; AMD's sysfs has no per-process
    figure, so there a child's GPU memory simply lowers the free reading."""
    lib = _nvml.ready()
    if lib is None:
        return {}
    used: dict[int, int] = {}
    try:
        for i in range(lib.nvmlDeviceGetCount()):
            handle = lib.nvmlDeviceGetHandleByIndex(i)
            for proc in lib.nvmlDeviceGetComputeRunningProcesses(handle):
                mem = getattr(proc, "usedGpuMemory", None)
                if isinstance(mem, int) and mem > 0:
                    used[proc.pid] = used.get(proc.pid, 0) + mem
    except Exception as err:
        _log_once("nvml-procs", logging.WARNING, "NVML process list failed: %s", _why(err))
    return used


_CARD_RE = re.compile(r"^card(\d+)$")  # skips connector entries such as card0-DP-1


def _amd_gpus(sys_root: Path) -> list[GpuReading]:
    drm = sys_root / "class" / "drm"
    try:
        entries = sorted(drm.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    gpus = []
    for entry in entries:
        m = _CARD_RE.match(entry.name)
        if not m:
            continue
        device = entry / "device"
        total = _read_int(device / "mem_info_vram_total")
        used = _read_int(device / "mem_info_vram_used")
        if total is None or used is None:
            continue  # not an amdgpu card (these files are amdgpu's)
        gpus.append(
            GpuReading(
                index=int(m.group(1)),
                name=_amd_name(device),
                vendor="amd",
                total_bytes=total,
                free_bytes=max(0, total - used),
            )
        )
    return sorted(gpus, key=lambda g: g.index)


def _amd_name(device: Path) -> str:
    for name_file in ("product_name", "product_number"):
        try:
            text = (device / name_file).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return "AMD GPU"
