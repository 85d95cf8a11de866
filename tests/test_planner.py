"""The capacity planner: priorities, RAM and GPU budgets, measured memory, hysteresis."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor_app.capacity import GpuReading, Readings
from supervisor_app.config import TypeConfig, load_config
from supervisor_app.model_servers import LoadedModel, ModelServerReading, ReservedModel
from supervisor_app.planner import (
    LIMITED_BY_GPU,
    LIMITED_BY_RAM,
    MAX_REACHED,
    MIN_OVER_BUDGET,
    NO_GPU,
    PlanEntry,
    Planner,
    plan_targets,
)

MiB = 1024**2
GiB = 1024**3
SHIPPED = Path(__file__).resolve().parent.parent / "config" / "jobvisor.yaml"


def kind(
    *,
    min: int = 0,
    max: int = 4,
    priority: int = 0,
    mem: int = 100 * MiB,
    gpu: int = 0,
    concurrency: int = 1,
    cpus: float = 0.0,
) -> TypeConfig:
    return TypeConfig(
        processes={"min": min, "max": max},
        priority=priority,
        memory_per_job=mem,
        gpu_memory_per_job=gpu,
        concurrency=concurrency,
        cpus_per_process=cpus,
    )


def machine(ram: int, gpus: list[int] | None = None, cpus: int = 8) -> Readings:
    return Readings(
        memory_available=ram,
        memory_total=64 * GiB,
        cpu_count=cpus,
        gpus=[GpuReading(i, "test", "override", free, free) for i, free in enumerate(gpus or [])],
    )


def counts(plan: dict[str, PlanEntry]) -> dict[str, int]:
    return {name: entry.processes for name, entry in plan.items()}


# --- the budget rule -----------------------------------------------------------------------


def test_cpu_bound_types_never_get_more_processes_than_the_machine_has_cpus():
    # Seen: pdf=4 on 2 CPUs. A type declaring cpus_per_process shares the CPU budget; a
    # type that mostly waits (0) does not touch it.
    types = {"pdf": kind(min=1, max=4, priority=20, cpus=1), "vision": kind(max=4, priority=10),
             "thumb": kind(max=4, priority=5, cpus=0.5)}
    plan = plan_targets(types, machine(64 * GiB, cpus=2))
    assert counts(plan) == {"pdf": 2, "vision": 4, "thumb": 0}
    assert plan["pdf"].reason == "limited by CPUs" and plan["thumb"].reason == "limited by CPUs"
    assert counts(plan_targets(types, machine(64 * GiB, cpus=8))) == \
        {"pdf": 4, "vision": 4, "thumb": 4}
    # A min beyond the CPUs still runs, said so.
    over = plan_targets({"pdf": kind(min=3, max=4, cpus=1)}, machine(64 * GiB, cpus=2))
    assert counts(over) == {"pdf": 3} and over["pdf"].reason == "min (over budget)"


def test_the_shipped_pdf_type_is_cpu_bound():
    assert load_config(SHIPPED).types["pdf"].cpus_per_process == 1


def test_every_type_reaches_max_when_everything_fits() -> None:
    types = {"a": kind(max=3), "b": kind(max=2, gpu=GiB)}
    plan = plan_targets(types, machine(8 * GiB, gpus=[16 * GiB]))
    assert plan == {"a": PlanEntry(3, MAX_REACHED), "b": PlanEntry(2, MAX_REACHED)}


def test_higher_priority_type_is_filled_before_lower_grows() -> None:
    types = {"low": kind(priority=1), "high": kind(priority=10)}
    plan = plan_targets(types, machine(500 * MiB))
    assert plan["high"] == PlanEntry(4, MAX_REACHED)
    assert plan["low"] == PlanEntry(1, LIMITED_BY_RAM)


def test_equal_priorities_are_served_by_name() -> None:
    types = {"zeta": kind(priority=5), "alpha": kind(priority=5)}
    plan = plan_targets(types, machine(500 * MiB))
    assert counts(plan) == {"alpha": 4, "zeta": 1}


def test_every_type_gets_its_min_before_anyone_grows() -> None:
    types = {"high": kind(priority=10, max=8), "low": kind(priority=1, min=2)}
    plan = plan_targets(types, machine(500 * MiB))
    assert counts(plan) == {"high": 3, "low": 2}


def test_min_is_granted_even_over_budget_and_says_so() -> None:
    types = {"big": kind(min=2, mem=GiB), "small": kind(min=0, max=2)}
    plan = plan_targets(types, machine(GiB))
    assert plan["big"] == PlanEntry(2, MIN_OVER_BUDGET)
    assert plan["small"] == PlanEntry(0, LIMITED_BY_RAM)


def test_reserve_memory_is_kept_free() -> None:
    types = {"a": kind(max=10)}
    assert counts(plan_targets(types, machine(GiB)))["a"] == 10
    assert counts(plan_targets(types, machine(GiB), reserve_memory=512 * MiB))["a"] == 5


def test_ram_need_is_memory_per_job_times_concurrency() -> None:
    types = {"a": kind(mem=100 * MiB, concurrency=4, max=10)}
    assert counts(plan_targets(types, machine(1000 * MiB)))["a"] == 2


def test_measured_rss_above_declared_need_counts() -> None:
    types = {"a": kind(mem=100 * MiB, max=10)}
    # Two children already hold 400 MiB each: 800 MiB held + 400 MiB free = 1200 MiB,
    # at a measured 400 MiB per process.
    plan = plan_targets(types, machine(400 * MiB), {"a": [400 * MiB, 400 * MiB]})
    assert plan["a"] == PlanEntry(3, LIMITED_BY_RAM)


def test_measured_rss_below_declared_need_does_not_lower_it() -> None:
    types = {"a": kind(mem=200 * MiB, max=10)}
    plan = plan_targets(types, machine(600 * MiB), {"a": [50 * MiB, 50 * MiB]})
    assert counts(plan)["a"] == 3  # (600 + 100) MiB / 200 MiB


def test_memory_held_by_our_children_counts_as_available() -> None:
    types = {"a": kind(mem=300 * MiB)}
    # Little is free, but our own four children hold the memory they need.
    plan = plan_targets(types, machine(100 * MiB), {"a": [300 * MiB] * 4})
    assert plan["a"] == PlanEntry(4, MAX_REACHED)


def test_gpu_type_is_limited_by_free_gpu_memory() -> None:
    types = {"vision": kind(gpu=GiB, concurrency=2)}
    plan = plan_targets(types, machine(8 * GiB, gpus=[5 * GiB]), reserve_gpu_memory=GiB)
    assert plan["vision"] == PlanEntry(2, LIMITED_BY_GPU)


def test_free_memory_of_all_gpus_is_summed() -> None:
    types = {"vision": kind(gpu=GiB, max=8)}
    assert counts(plan_targets(types, machine(8 * GiB, gpus=[2 * GiB, 3 * GiB])))["vision"] == 5


def test_measured_gpu_memory_of_our_children_counts_as_available() -> None:
    types = {"vision": kind(gpu=2 * GiB)}
    readings = machine(8 * GiB, gpus=[GiB])  # our two children hold 4 GiB of it
    plan = plan_targets(types, readings, {"vision": [MiB, MiB]}, reserve_gpu_memory=GiB,
                        held_gpu=4 * GiB)
    assert plan["vision"] == PlanEntry(2, LIMITED_BY_GPU)


def test_declared_gpu_need_of_running_children_is_not_counted_as_held() -> None:
    # Ollama, not our children, holds the memory: a low free reading must shrink us.
    types = {"vision": kind(gpu=2 * GiB)}
    readings = machine(8 * GiB, gpus=[GiB])
    plan = plan_targets(types, readings, {"vision": [MiB, MiB]}, reserve_gpu_memory=GiB)
    assert plan["vision"] == PlanEntry(0, LIMITED_BY_GPU)


def with_model_server(readings: Readings, *, loaded: int = 0, unloaded: int = 0) -> Readings:
    """`readings` plus one model server with a model of `loaded` bytes loaded and one of
    `unloaded` bytes it had loaded earlier (0: none)."""
    readings.model_servers = [ModelServerReading(
        "http://localhost:11434", "default", True, True,
        models=[LoadedModel("feedback:8b", loaded)] if loaded else [],
        reserved=[ReservedModel("vision:7b", unloaded, 120.0)] if unloaded else [])]
    return readings


def test_a_model_the_server_unloaded_keeps_its_memory_off_the_gpu_budget() -> None:
    types = {"vision": kind(gpu=2 * GiB, concurrency=2)}  # 4 GiB a process
    seen = with_model_server(machine(8 * GiB, gpus=[13 * GiB]), unloaded=4 * GiB)
    assert plan_targets(types, machine(8 * GiB, gpus=[13 * GiB]),
                        reserve_gpu_memory=GiB)["vision"] == PlanEntry(3, LIMITED_BY_GPU)
    # The unloaded model comes back with the next job: one process fewer.
    assert plan_targets(types, seen, reserve_gpu_memory=GiB)["vision"] == \
        PlanEntry(2, LIMITED_BY_GPU)
    planner = Planner(reserve_gpu_memory=GiB)
    assert planner.replan(types, seen)["vision"].processes == 2
    assert planner.last_budget.model_reserved == 4 * GiB
    assert planner.last_budget.gpu == 8 * GiB


def test_a_model_loaded_now_is_not_subtracted_twice() -> None:
    # Its memory already lowers the free reading (13 GiB is what is left beside it).
    types = {"vision": kind(gpu=2 * GiB, concurrency=2)}
    loaded = with_model_server(machine(8 * GiB, gpus=[13 * GiB]), loaded=5 * GiB)
    assert loaded.model_memory_held == 5 * GiB and loaded.model_memory_reserved == 0
    assert plan_targets(types, loaded, reserve_gpu_memory=GiB)["vision"] == \
        PlanEntry(3, LIMITED_BY_GPU)


def test_without_gpu_a_reserved_model_changes_nothing() -> None:
    types = {"vision": kind(min=1, gpu=GiB), "pdf": kind(max=3)}
    plan = plan_targets(types, with_model_server(machine(8 * GiB), unloaded=4 * GiB))
    assert plan == {"vision": PlanEntry(1, NO_GPU), "pdf": PlanEntry(3, MAX_REACHED)}


def test_gpu_budget_goes_to_higher_priority_first() -> None:
    types = {"feedback": kind(priority=5, gpu=2 * GiB), "vision": kind(priority=10, gpu=2 * GiB)}
    plan = plan_targets(types, machine(8 * GiB, gpus=[11 * GiB]), reserve_gpu_memory=GiB)
    assert counts(plan) == {"vision": 4, "feedback": 1}


def test_without_gpu_a_gpu_type_gets_only_min_and_cpu_types_are_unaffected() -> None:
    types = {"vision": kind(min=1, gpu=GiB, priority=10), "pdf": kind(max=3)}
    plan = plan_targets(types, machine(8 * GiB, gpus=[]), reserve_gpu_memory=GiB)
    assert plan["vision"] == PlanEntry(1, NO_GPU)
    assert plan["pdf"] == PlanEntry(3, MAX_REACHED)


def test_type_without_gpu_need_ignores_an_exhausted_gpu_budget() -> None:
    types = {"vision": kind(min=2, gpu=4 * GiB, priority=10), "pdf": kind(max=3)}
    plan = plan_targets(types, machine(8 * GiB, gpus=[GiB]))
    assert plan["vision"] == PlanEntry(2, MIN_OVER_BUDGET)
    assert plan["pdf"] == PlanEntry(3, MAX_REACHED)


def test_plan_does_not_depend_on_mapping_order() -> None:
    a = {"x": kind(priority=1), "y": kind(priority=1), "z": kind(priority=2)}
    b = dict(reversed(list(a.items())))
    readings = machine(700 * MiB)
    assert counts(plan_targets(a, readings)) == counts(plan_targets(b, readings))


def test_shipped_config_plans_without_gpu() -> None:
    cfg = load_config(SHIPPED)
    planner = Planner(cfg.supervisor.reserve.memory, cfg.supervisor.reserve.gpu_memory)
    plan = planner.replan(cfg.types, machine(16 * GiB, gpus=[]))
    assert plan["vision"] == PlanEntry(1, NO_GPU)
    assert plan["feedback"] == PlanEntry(1, NO_GPU)
    assert plan["pdf"] == PlanEntry(4, MAX_REACHED)
    assert plan["backup"] == PlanEntry(1, MAX_REACHED)


@pytest.mark.parametrize(
    ("gpu_free", "vision", "feedback"),
    [
        (8 * GiB, PlanEntry(1, LIMITED_BY_GPU), PlanEntry(1, MIN_OVER_BUDGET)),
        (12 * GiB, PlanEntry(1, LIMITED_BY_GPU), PlanEntry(1, LIMITED_BY_GPU)),
        (24 * GiB, PlanEntry(4, MAX_REACHED), PlanEntry(1, LIMITED_BY_GPU)),
    ],
)
def test_shipped_config_gives_gpu_to_vision_before_feedback(
    gpu_free: int, vision: PlanEntry, feedback: PlanEntry
) -> None:
    # The worked example in docs/planning.md.
    cfg = load_config(SHIPPED)
    planner = Planner(cfg.supervisor.reserve.memory, cfg.supervisor.reserve.gpu_memory)
    plan = planner.replan(cfg.types, machine(16 * GiB, gpus=[gpu_free]))
    assert (plan["vision"], plan["feedback"]) == (vision, feedback)


# --- hysteresis ----------------------------------------------------------------------------


def test_first_plan_applies_at_once() -> None:
    planner = Planner()
    assert counts(planner.replan({"a": kind()}, machine(GiB))) == {"a": 4}


def test_low_ram_shrinks_lower_priority_type_first() -> None:
    planner = Planner()
    types = {"high": kind(priority=10, max=4), "low": kind(priority=1, max=4, min=1)}
    assert counts(planner.replan(types, machine(GiB))) == {"high": 4, "low": 4}
    # Nothing running yet in this test, so available RAM is all the planner sees.
    plan = planner.replan(types, machine(600 * MiB))
    assert counts(plan) == {"high": 4, "low": 2}
    assert plan["low"].reason == LIMITED_BY_RAM
    plan = planner.replan(types, machine(300 * MiB))
    assert counts(plan) == {"high": 2, "low": 1}  # low's min is served before high grows
    assert plan["high"].reason == LIMITED_BY_RAM


def test_shrinking_applies_at_once() -> None:
    planner = Planner()
    types = {"a": kind(max=8)}
    planner.replan(types, machine(GiB))
    assert counts(planner.replan(types, machine(300 * MiB))) == {"a": 3}


def test_growth_needs_two_consecutive_replans() -> None:
    planner = Planner()
    types = {"a": kind(max=8)}
    planner.replan(types, machine(300 * MiB))
    first = planner.replan(types, machine(GiB))
    assert first["a"].processes == 3
    assert first["a"].reason == "growth to 8 pending (1/2)"
    assert planner.replan(types, machine(GiB))["a"] == PlanEntry(8, MAX_REACHED)


def test_interrupted_growth_streak_starts_over() -> None:
    planner = Planner()
    types = {"a": kind(max=8)}
    planner.replan(types, machine(300 * MiB))
    planner.replan(types, machine(GiB))  # 1/2
    planner.replan(types, machine(300 * MiB))  # back to 3: streak broken
    assert planner.replan(types, machine(GiB))["a"].processes == 3  # 1/2 again
    assert planner.replan(types, machine(GiB))["a"].processes == 8


def test_growth_goes_to_what_every_replan_in_the_streak_agreed_on() -> None:
    planner = Planner()
    types = {"a": kind(max=8)}
    planner.replan(types, machine(200 * MiB))  # 2
    planner.replan(types, machine(GiB))  # wants 8
    plan = planner.replan(types, machine(500 * MiB))  # wants 4: both agree on 4
    assert plan["a"].processes == 4


def test_growth_needs_a_margin_but_current_processes_do_not() -> None:
    planner = Planner(grow_margin=0.10)
    types = {"a": kind(mem=GiB, max=8)}
    planner.replan(types, machine(2 * GiB))  # 2 processes
    tight = machine(3 * GiB + 50 * MiB)  # a third fits, but not with 10% to spare
    for _ in range(3):
        assert planner.replan(types, tight)["a"] == PlanEntry(2, LIMITED_BY_RAM)
    roomy = machine(3 * GiB + 200 * MiB)
    planner.replan(types, roomy)
    assert planner.replan(types, roomy)["a"].processes == 3


def test_count_hovering_at_the_edge_does_not_flap() -> None:
    planner = Planner()
    types = {"a": kind(mem=GiB, max=8)}
    planner.replan(types, machine(2 * GiB))
    # Free RAM wobbles around "just enough for 3": never grows, never shrinks below 2.
    for ram in [3 * GiB + 10 * MiB, 3 * GiB - 10 * MiB] * 5:
        assert planner.replan(types, machine(ram))["a"].processes == 2


def test_raised_min_applies_at_once() -> None:
    planner = Planner()
    planner.replan({"a": kind(min=1, max=8)}, machine(200 * MiB))
    plan = planner.replan({"a": kind(min=5, max=8)}, machine(GiB))
    assert plan["a"].processes == 5


def test_raised_min_during_a_growth_streak_never_plans_below_min() -> None:
    planner = Planner(grow_after=3)
    planner.replan({"a": kind(min=1, max=8)}, machine(100 * MiB))  # 1
    planner.replan({"a": kind(min=1, max=8)}, machine(300 * MiB))  # wants 3 (1/3)
    raised = {"a": kind(min=4, max=8)}
    assert planner.replan(raised, machine(GiB))["a"].processes == 4  # min at once
    assert planner.replan(raised, machine(GiB))["a"].processes == 4  # 2/3 toward 8
    assert planner.replan(raised, machine(GiB))["a"].processes == 8


def test_lowered_max_applies_at_once() -> None:
    planner = Planner()
    planner.replan({"a": kind(max=8)}, machine(GiB))
    assert planner.replan({"a": kind(max=2)}, machine(GiB))["a"] == PlanEntry(2, MAX_REACHED)


def test_grow_after_one_grows_immediately() -> None:
    planner = Planner(grow_after=1)
    types = {"a": kind(max=8)}
    planner.replan(types, machine(200 * MiB))
    assert planner.replan(types, machine(GiB))["a"].processes == 8


def test_removed_type_is_forgotten_and_starts_fresh_when_readded() -> None:
    planner = Planner()
    planner.replan({"a": kind(), "b": kind()}, machine(GiB))
    planner.replan({"a": kind()}, machine(GiB))
    assert "b" not in planner.applied
    # Back again: a first plan, applied at once rather than waiting out a growth streak.
    assert planner.replan({"a": kind(), "b": kind()}, machine(2 * GiB))["b"].processes == 4


def test_same_inputs_give_same_plans() -> None:
    types = {"a": kind(priority=3), "b": kind(gpu=GiB), "c": kind(mem=300 * MiB)}
    sequence = [machine(GiB, [3 * GiB]), machine(400 * MiB, [GiB]), machine(2 * GiB, [5 * GiB])]
    runs = []
    for _ in range(2):
        planner = Planner(reserve_memory=64 * MiB, reserve_gpu_memory=512 * MiB)
        runs.append([planner.replan(types, r) for r in sequence * 2])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("ram", [0, 50 * MiB])
def test_no_ram_at_all_still_plans_every_min(ram: int) -> None:
    types = {"a": kind(min=1), "b": kind(min=0)}
    plan = Planner(reserve_memory=512 * MiB).replan(types, machine(ram))
    assert plan == {"a": PlanEntry(1, MIN_OVER_BUDGET), "b": PlanEntry(0, LIMITED_BY_RAM)}
