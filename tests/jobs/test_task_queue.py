"""`jobs.task_queue.TaskQueue` on a real local Ray: best rank first, a bounded number at a time,
jobs made possible late jump the queue, groups opened a few at a time, failures cancel."""

from __future__ import annotations

import time

import pytest

from jobs.task_queue import Job, TaskQueue


def _echo(name: str, seconds: float = 0.0) -> str:
    time.sleep(seconds)
    return name


@pytest.fixture(scope="module")
def echo(ray_local):
    return ray_local.remote(_echo).options(num_cpus=1)


def _job(echo, name, rank, log, seconds=0.05, tag=None):
    def send():
        log.append(("sent", name))
        return echo.remote(name, seconds), name
    return Job(rank, send, tag)


def test_one_slot_runs_jobs_best_rank_first_and_late_jobs_jump_the_queue(echo, ray_local):
    log, handled = [], []
    group = lambda: [_job(echo, n, r, log) for n, r in (("c", 2), ("a", 0), ("b", 1), ("d", 2))]  # noqa: E731
    made_late = []

    def later():
        if made_late:  # once, after the first result
            return []
        made_late.append(True)
        return [lambda: [_job(echo, "late", 0, log)]]

    def receive(name, ref):
        assert ray_local.get(ref) == name

    TaskQueue(slots=1, max_open=3).run([group], receive, handled.append, later=later)
    assert handled == ["a", "late", "b", "c", "d"]  # ties keep their order ("c" before "d")


def test_slots_bound_what_is_submitted(echo, ray_local):
    log, running_at_receive = [], []
    queue = TaskQueue(slots=2, max_open=1)
    jobs = lambda: [_job(echo, f"j{i}", 0, log, seconds=0.2) for i in range(5)]  # noqa: E731

    def receive(name, ref):
        running_at_receive.append(queue.running)
        ray_local.get(ref)

    queue.run([jobs], receive, lambda kept: None)
    assert max(running_at_receive) <= 1  # one just finished, at most one other still running
    unbounded, sent_before_first = TaskQueue(slots=None, max_open=1), []
    unbounded.run([jobs], lambda name, ref: sent_before_first.append(len(log)), lambda kept: None)
    assert sent_before_first[0] == 5 + 5  # every job of the group was submitted at once


def test_groups_open_a_few_at_a_time_and_waiting_sees_unopened_and_queued(echo, ray_local):
    log, opened = [], []

    def group(g):
        def open_():
            opened.append((g, len([e for e in log if e[0] == "sent"])))
            return [_job(echo, f"{g}{i}", 0, log, tag=("probe", g)) for i in range(2)]
        return open_

    queue = TaskQueue(slots=2, max_open=1)
    seen = []

    def receive(name, ref):
        seen.append((name, queue.waiting(lambda tag: tag == ("probe", "B")), queue.busy))

    queue.run([group("A"), group("B")], receive, lambda kept: None)
    assert opened == [("A", 0), ("B", 2)]  # B opened only when A's jobs were done
    assert seen[0][1] is True  # B unopened: still waiting
    assert seen[-1] == (seen[-1][0], False, False)  # the last result: nothing left


def test_a_failure_while_handling_cancels_what_runs(echo, ray_local):
    from ray.exceptions import TaskCancelledError

    refs = {}

    def job(name, seconds):
        def send():
            refs[name] = echo.remote(name, seconds)
            return refs[name], name
        return Job(0, send)

    def handle(kept):
        raise RuntimeError("logging failed")

    with pytest.raises(RuntimeError, match="logging failed"):
        TaskQueue(slots=2, max_open=1).run([lambda: [job("fast", 0.01), job("slow", 60)]],
                                           lambda name, ref: None, handle)
    with pytest.raises(TaskCancelledError):
        ray_local.get(refs["slow"], timeout=30)


def test_slots_come_from_the_embedded_ray_only(ray_local):
    from jobs.ray_runtime import task_slots

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert task_slots(1) == cpus and task_slots(0.5) == 2 * cpus and task_slots(64) == 1
    with pytest.raises(ValueError, match="slots must be"):
        TaskQueue(slots=0, max_open=1)
