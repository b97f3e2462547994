"""The activation worker serves admin work before pins, and pins that need a preparation are budgeted per client
and per task."""

import threading

import anyio
import pytest

from service.serving.preparation import ActivationWorker, PinBudget, PinRefused, Priority

pytestmark = pytest.mark.anyio


async def test_waiting_admin_work_runs_before_waiting_pins_and_one_at_a_time():
    worker, started, order, running = ActivationWorker(), threading.Event(), [], []
    release = threading.Event()

    def job(name: str) -> None:
        running.append(name)
        assert len(running) == 1, running  # never two preparations at once
        if name == "first pin":
            started.set()
            release.wait(5)
        order.append(name)
        running.remove(name)

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: worker.run(job, "first pin", priority=Priority.PIN))
        await anyio.to_thread.run_sync(started.wait, 5)
        for name, priority in [("pin a", Priority.PIN), ("pin b", Priority.PIN), ("upload", Priority.ADMIN),
                               ("pin c", Priority.PIN), ("activate", Priority.ADMIN)]:
            group.start_soon(lambda n=name, p=priority: worker.run(job, n, priority=p))
            await anyio.sleep(0.01)
        assert worker.queued_pins == 3
        release.set()
    # an upload waits at most for the one pin already running
    assert order == ["first pin", "upload", "activate", "pin a", "pin b", "pin c"]


async def test_a_cancelled_waiter_leaves_the_worker_usable():
    worker, release = ActivationWorker(), threading.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: worker.run(release.wait, 5, priority=Priority.ADMIN))
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.05):
            await worker.run(lambda: None, priority=Priority.PIN)
        release.set()
    assert await worker.run(lambda: "ran", priority=Priority.PIN) == "ran"


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
