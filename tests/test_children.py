"""A slot's exit bookkeeping (supervisor_app.children), without processes: the restart
delay a run of quick failures earns, before and after the slot turns FATAL."""

from __future__ import annotations

import logging

from supervisor_app import children
from supervisor_app.children import FATAL_MAX_BACKOFF, Slot
from supervisor_app.config import RestartConfig


def _fail_quickly(slot: Slot, now: float, policy: RestartConfig) -> float:
    """One crash holding no job, 0.1 s after starting; returns the delay it earned."""
    slot.started_at = now - 0.1
    slot.proc = None
    children.after_exit(slot, 17, now, policy)
    assert slot.state == "backoff" and slot.pending_exit is not None  # awaits its rescue
    children.settle_exit(slot, 0, now, policy)
    return slot.restart_at - now


def test_a_slot_failing_quickly_forever_backs_off_up_to_the_fatal_cap_and_stays_fatal(caplog):
    caplog.set_level(logging.CRITICAL, logger="jobvisor.children")  # 1,100 child_fatal lines
    assert FATAL_MAX_BACKOFF == 300.0  # the 5 minutes the runbook states
    policy = RestartConfig(backoff=0.2, max_backoff=5.0, healthy_after=3.0,
                           max_quick_failures=4)
    slot = Slot("crashy", 0, "fp")
    now = 0.0  # each retry at the same clock: restart_at - now is then the exact delay
    delays, states = [], []
    # A slot that fails every time for days: at 300 s a try, 1,100 tries are ~92 hours
    # (past 2**1024, where an uncapped exponent would overflow a float).
    for _ in range(1100):
        delays.append(_fail_quickly(slot, now, policy))
        states.append(slot.state)
    # Before FATAL: backoff doubling, capped by max_backoff (0.2, 0.4, 0.8 s).
    assert [round(d, 6) for d in delays[:3]] == [0.2, 0.4, 0.8]
    assert states[:3] == ["backoff"] * 3
    # From the 4th quick failure on: fatal, min(300, max(max_backoff, backoff·2^(n−1))).
    assert [round(d, 6) for d in delays[3:13]] == [
        5.0, 5.0, 6.4, 12.8, 25.6, 51.2, 102.4, 204.8, 300.0, 300.0]
    assert set(states[3:]) == {"fatal"}
    assert max(delays) == FATAL_MAX_BACKOFF
    assert all(d == FATAL_MAX_BACKOFF for d in delays[11:])
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))  # never shrinks
    assert slot.quick_failures == 1100 and slot.restarts == 1100
    view = slot.view(now + 200.0)
    assert view["state"] == "fatal" and view["retry_in_s"] == 100.0


def test_the_fatal_delay_is_at_least_max_backoff_and_at_most_the_cap():
    # max_backoff above the cap: a FATAL slot still retries every 5 minutes, no slower.
    slow = RestartConfig(backoff=1.0, max_backoff=600.0, healthy_after=10.0,
                         max_quick_failures=2)
    slot = Slot("t", 0, "fp")
    delays = [_fail_quickly(slot, 0.0, slow) for _ in range(5)]
    assert delays == [1.0, 300.0, 300.0, 300.0, 300.0]
    # max_backoff below the growing delay: the doubling goes on past it, up to the cap.
    fast = RestartConfig(backoff=1.0, max_backoff=60.0, healthy_after=10.0,
                         max_quick_failures=5)
    slot = Slot("t", 0, "fp")
    delays = [_fail_quickly(slot, 0.0, fast) for _ in range(11)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 60.0, 60.0, 64.0, 128.0, 256.0, 300.0, 300.0]
    assert slot.state == "fatal"


def test_a_long_run_starts_the_count_afresh_and_a_crash_holding_jobs_does_not_count():
    policy = RestartConfig(backoff=0.5, max_backoff=5.0, healthy_after=3.0,
                           max_quick_failures=3)
    slot = Slot("t", 0, "fp")
    for _ in range(3):
        _fail_quickly(slot, 100.0, policy)
    assert slot.state == "fatal"
    # A crash while holding jobs: the jobs' fault; the base backoff, no count.
    slot.started_at = 99.9
    children.after_exit(slot, 17, 100.0, policy)
    children.settle_exit(slot, 2, 100.0, policy)
    assert slot.state == "backoff" and slot.restart_at == 100.5 and slot.quick_failures == 3
    # A run past healthy_after, then a crash: the count starts afresh.
    slot.started_at = 90.0
    children.after_exit(slot, 17, 100.0, policy)
    children.settle_exit(slot, 0, 100.0, policy)
    assert slot.state == "backoff" and slot.quick_failures == 0 and slot.restart_at == 100.5
