"""How many processes each job type gets, from the machine's readings and the quotas.

The rule (also in docs/planning.md):

1. Types are ordered by ``priority``, highest first; ties by name.
2. Budgets.
   RAM: ``memory_available`` + RSS currently held by our own children − ``reserve.memory``
   (our children's memory is ours to hand out again, so it counts as available).
   GPU: free GPU memory summed over all GPUs + the GPU memory our own children are
   measured to hold (NVML per-process usage) − ``reserve.gpu_memory`` − the memory of
   models a model server on our GPUs had loaded and has unloaded
   (``Readings.model_memory_reserved``, see model_servers.py): they load again with the
   next job. A model loaded now is not subtracted: it already lowers the free reading.
3. Per-process needs.
   RAM: max(``memory_per_job`` × ``concurrency``, average RSS of that type's running
   children) — measured memory counts when a type uses more than it declared.
   GPU: ``gpu_memory_per_job`` × ``concurrency``; 0 means the type doesn't touch the GPU
   budget.
   CPU: ``cpus_per_process`` (0, the default, for types that mostly wait); the CPU budget
   is the CPUs this supervisor may use (cgroup quota and affinity, see capacity.py), so
   CPU-bound types together never get more processes than the machine has CPUs.
4. Every type first gets its ``min`` (charged to the budgets even when they don't cover
   it; that type's reason is then "min (over budget)"). With no GPU at all, a GPU type
   gets only its ``min``.
5. Then, in priority order, each type grows one process at a time toward ``max`` while
   its per-process needs fit what is left. A higher-priority type is filled before a
   lower one gets anything beyond its ``min``, so when RAM gets short the lowest
   priority types are the first to shrink.
6. Hysteresis, so counts don't flap: a smaller count applies at once; a larger count
   applies only once it has been planned on ``grow_after`` consecutive replans (default
   2), and each process above the current count must fit with a margin
   (``grow_margin``, default 10% of its per-process need). The first plan for a type,
   and growth up to a raised ``min``, apply at once.

Pure and deterministic: no clocks, no I/O. ``plan_targets`` is the budget rule as a
function; ``Planner`` adds the hysteresis state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from supervisor_app.capacity import Readings

log = logging.getLogger("jobvisor.planner")

MAX_REACHED = "max reached"
LIMITED_BY_RAM = "limited by RAM"
LIMITED_BY_GPU = "limited by GPU memory"
LIMITED_BY_CPU = "limited by CPUs"
NO_GPU = "no GPU (min only)"
MIN_OVER_BUDGET = "min (over budget)"


class _Processes(Protocol):
    min: int
    max: int


class PlanType(Protocol):
    """What the planner reads from a type's settings (config.TypeConfig fits)."""

    processes: _Processes
    concurrency: int
    memory_per_job: int
    gpu_memory_per_job: int
    cpus_per_process: float
    priority: int


@dataclass(frozen=True)
class PlanEntry:
    processes: int
    reason: str


@dataclass(frozen=True)
class Budget:
    """What the plan had to work with; for logs and the status page."""

    ram: int
    gpu: int
    has_gpu: bool
    model_reserved: int = 0  # GPU bytes kept for models a model server unloaded


def ram_need(t: PlanType, rss: Sequence[int] = ()) -> int:
    """RAM one process of this type needs: declared, or measured if that is more."""
    declared = t.memory_per_job * t.concurrency
    measured = sum(rss) // len(rss) if rss else 0
    return max(declared, measured)


def gpu_need(t: PlanType) -> int:
    return t.gpu_memory_per_job * t.concurrency


def budget(
    types: Mapping[str, PlanType],
    readings: Readings,
    running: Mapping[str, Sequence[int]],
    reserve_memory: int,
    reserve_gpu_memory: int,
    held_gpu: int = 0,
) -> Budget:
    # Children of types no longer configured still hold memory, and that memory comes
    # back once they are stopped, so all our children's RSS counts. GPU memory counts
    # only as measured per child: declared figures are a need, not a holding.
    held_ram = sum(sum(rss) for rss in running.values())
    # A model a server has loaded is already "not free"; one it unloaded is not, yet it
    # comes back with the next job that needs it, so its memory is not ours to give away.
    model_reserved = readings.model_memory_reserved
    return Budget(
        ram=readings.memory_available + held_ram - reserve_memory,
        gpu=readings.gpu_free + held_gpu - reserve_gpu_memory - model_reserved,
        has_gpu=bool(readings.gpus),
        model_reserved=model_reserved,
    )


def plan_targets(
    types: Mapping[str, PlanType],
    readings: Readings,
    running: Mapping[str, Sequence[int]] | None = None,
    *,
    reserve_memory: int = 0,
    reserve_gpu_memory: int = 0,
    current: Mapping[str, int] | None = None,
    grow_margin: float = 0.0,
    held_gpu: int = 0,
) -> dict[str, PlanEntry]:
    """The budget rule without hysteresis: how many processes fit now.

    ``current`` and ``grow_margin``: a process beyond a type's current count must fit
    with ``need × (1 + grow_margin)``; the ones it already runs need only ``need``, and
    a type absent from ``current`` (a first plan) needs no margin."""
    running = running or {}
    current = current or {}
    b = budget(types, readings, running, reserve_memory, reserve_gpu_memory, held_gpu)
    ram_left, gpu_left = b.ram, b.gpu
    cpu_left = float(readings.cpu_count)
    order = sorted(types, key=lambda name: (-types[name].priority, name))
    needs = {n: (ram_need(types[n], running.get(n, ())), gpu_need(types[n])) for n in order}

    counts: dict[str, int] = {}
    over_budget: set[str] = set()
    for name in order:
        t, (ram, gpu) = types[name], needs[name]
        counts[name] = t.processes.min
        ram_left -= t.processes.min * ram
        cpu_left -= t.processes.min * t.cpus_per_process
        if gpu:
            gpu_left -= t.processes.min * gpu
        gpu_short = gpu and b.has_gpu and gpu_left < 0  # no GPU at all is NO_GPU, below
        if t.processes.min and (ram_left < 0 or gpu_short
                                or (t.cpus_per_process and cpu_left < 0)):
            over_budget.add(name)

    plan: dict[str, PlanEntry] = {}
    for name in order:
        t, (ram, gpu) = types[name], needs[name]
        reason = MAX_REACHED
        while counts[name] < t.processes.max:
            growing = name in current and counts[name] >= current[name]
            factor = 1.0 + grow_margin if growing else 1.0
            if gpu and not b.has_gpu:
                reason = NO_GPU
                break
            if ram * factor > ram_left:
                reason = LIMITED_BY_RAM
                break
            if gpu and gpu * factor > gpu_left:
                reason = LIMITED_BY_GPU
                break
            if t.cpus_per_process and t.cpus_per_process > cpu_left + 1e-9:
                reason = LIMITED_BY_CPU
                break
            counts[name] += 1
            ram_left -= ram
            gpu_left -= gpu
            cpu_left -= t.cpus_per_process
        if name in over_budget and counts[name] == t.processes.min:
            reason = MIN_OVER_BUDGET
        plan[name] = PlanEntry(counts[name], reason)
    return plan


@dataclass
class Planner:
    """``plan_targets`` plus hysteresis. One instance lives as long as the supervisor;
    after a config reload, assign the new reserve values to the fields."""

    reserve_memory: int = 0
    reserve_gpu_memory: int = 0
    grow_after: int = 2  # consecutive replans a larger count must be planned on
    grow_margin: float = 0.10  # extra headroom (fraction of need) for each added process
    applied: dict[str, int] = field(default_factory=dict, init=False)  # counts in force
    last_budget: Budget | None = field(default=None, init=False, repr=False)
    # Per type, the larger counts planned on consecutive replans, oldest first.
    _pending: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    def replan(
        self,
        types: Mapping[str, PlanType],
        readings: Readings,
        running: Mapping[str, Sequence[int]] | None = None,
        held_gpu: int = 0,
    ) -> dict[str, PlanEntry]:
        """``running``: RSS in bytes of each running child, per type; ``held_gpu``: GPU
        memory our children hold, as measured."""
        running = running or {}
        self.last_budget = budget(
            types, readings, running, self.reserve_memory, self.reserve_gpu_memory, held_gpu
        )
        targets = plan_targets(
            types,
            readings,
            running,
            reserve_memory=self.reserve_memory,
            reserve_gpu_memory=self.reserve_gpu_memory,
            current=self.applied,
            grow_margin=self.grow_margin,
            held_gpu=held_gpu,
        )
        plan = {name: self._settle(name, types[name], entry) for name, entry in targets.items()}
        for gone in set(self.applied) - set(types):
            del self.applied[gone]
            self._pending.pop(gone, None)
        return plan

    def _settle(self, name: str, t: PlanType, target: PlanEntry) -> PlanEntry:
        before = self.applied.get(name)
        # Never below min (a raised min is a promise, not a capacity question) nor above max.
        floor = t.processes.min if before is None else max(t.processes.min, before)
        now = min(floor, t.processes.max)
        if before is None or target.processes <= now:
            self._pending.pop(name, None)
            return self._apply(name, before, target)
        # Entries no longer above the count in force (a raised min) don't count.
        streak = _trailing_above(self._pending.get(name, []), now) + [target.processes]
        self._pending[name] = streak
        if len(streak) < self.grow_after:
            if now != before:
                self.applied[name] = now  # a raised min applies at once
            return PlanEntry(now, _pending_reason(target.processes, streak, self.grow_after))
        # Grow to what every replan in the streak agreed on, not to the latest spike; what
        # was planned above that keeps counting toward the next step.
        grown = min(streak)
        rest = _trailing_above(streak, grown)
        if rest:
            self._pending[name] = rest
            reason = _pending_reason(target.processes, rest, self.grow_after)
        else:
            del self._pending[name]
            reason = target.reason
        return self._apply(name, before, PlanEntry(grown, reason))

    def _apply(self, name: str, before: int | None, entry: PlanEntry) -> PlanEntry:
        if before != entry.processes:
            log.debug("plan %s: %s -> %d (%s)", name, before, entry.processes, entry.reason)
        self.applied[name] = entry.processes
        return entry


def _pending_reason(target: int, streak: Sequence[int], grow_after: int) -> str:
    return f"growth to {target} pending ({len(streak)}/{grow_after})"


def _trailing_above(values: Sequence[int], floor: int) -> list[int]:
    """The run at the end of ``values`` that is entirely above ``floor``."""
    run: list[int] = []
    for v in reversed(values):
        if v <= floor:
            break
        run.insert(0, v)
    return run
