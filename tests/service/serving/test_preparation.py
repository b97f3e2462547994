"""Pins that need a preparation run on a low-priority thread of their own and are budgeted per client and per
task."""

import os
import threading

import pytest

from service.serving.preparation import PinBudget, PinRefused, PinWorker

pytestmark = pytest.mark.anyio


async def test_pins_are_prepared_on_one_thread_of_their_own_at_the_lowest_cpu_priority():
    worker = PinWorker()
    try:
        seen = [await worker.run(lambda: (threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0)))
                for _ in range(3)]
    finally:
        worker.close()
    assert len({tid for tid, _ in seen}) == 1 and seen[0][0] != threading.get_native_id()
    assert {nice for _, nice in seen} == {19}
    assert os.getpriority(os.PRIO_PROCESS, 0) != 19  # the caller's own priority is untouched


def test_each_client_and_each_task_has_its_own_budget_refilled_over_time():
    now = [0.0]
    budget = PinBudget(per_minute=2, max_queued=8, clock=lambda: now[0])
    for task in ("a", "b"):
        budget.take("alice", task, queued=0)
        budget.done("alice")
    with pytest.raises(PinRefused, match="client alice") as refused:
        budget.take("alice", "c", queued=0)
    assert refused.value.retry_after_s == pytest.approx(30)  # one token every 30 s
    budget.take("bob", "a", queued=0)
    budget.done("bob")
    with pytest.raises(PinRefused, match="task a"):  # bob has budget; task a has none left
        budget.take("bob", "a", queued=0)
    now[0] = 30.0
    budget.take("alice", "c", queued=0)


def test_one_preparation_at_a_time_per_client_and_a_bounded_queue():
    budget = PinBudget(per_minute=100, max_queued=2)
    budget.take("alice", "a", queued=0)
    with pytest.raises(PinRefused, match="already has"):
        budget.take("alice", "b", queued=0)
    with pytest.raises(PinRefused, match="waiting"):
        budget.take("bob", "b", queued=2)
    budget.done("alice")
    budget.take("alice", "b", queued=0)


def test_buckets_kept_stay_bounded_whatever_the_number_of_clients():
    now = [0.0]
    budget = PinBudget(per_minute=600, max_queued=8, clock=lambda: now[0])
    for i in range(3 * PinBudget.MAX_KEYS):
        budget.take(f"client {i}", "t" if i % 2 else "u", queued=0)
        budget.done(f"client {i}")
        now[0] += 1.0
    assert len(budget._buckets) <= PinBudget.MAX_KEYS + 2
