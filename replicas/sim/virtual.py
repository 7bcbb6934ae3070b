"""One simulated replica on a virtual clock (discrete events, deterministic).

The engine core schedules; instead of running a model, the executor advances the replica's clock by the
latency model's step time. ``advance_to(t)`` runs every step that *starts* before ``t``; a request added at
``t`` is first seen by the step starting at or after ``t``.

Runs of identical pure-decode steps are applied in one go (``jump=True``): the scheduler says how many steps
are certain to repeat (no finish, no failed allocation, no admission change), the latency model sums their
durations in closed form and stops at the deadline. ``jump=False`` steps one token at a time; both give the
same per-request results (tests/test_sim_equivalence.py).

A pending run is applied when it ends or when the engine's state must be current (an arrival). A stats
refresh (``stats``) leaves it alone: it reports the steps started so far as if they were applied
(``engine_stats`` counts them, their blocks included, without taking anything), so a refresh changes nothing
in the run. That is the common case: refreshes come more often than arrivals.
"""

from __future__ import annotations

import math
from typing import Any

from halffull.replicas.engine.request import Request
from halffull.replicas.engine.scheduler import Scheduler, SchedulerOutput
from halffull.replicas.engine.stats import engine_stats
from halffull.replicas.sim.latency import DecodeRunTimes, LatencyModel


def step_cost(out: SchedulerOutput) -> tuple[int, int, int, int]:
    """(tokens computed, attention pairs, KV tokens read, requests scheduled) of one step: the arguments of
    ``LatencyModel.step_time``."""
    num_tokens = attn_pairs = kv_read = 0
    computed_before = out.computed_before
    for request, n in out.num_scheduled_tokens.items():
        c = computed_before[request]
        num_tokens += n
        attn_pairs += n * c + n * (n + 1) // 2
        kv_read += c + n
    return num_tokens, attn_pairs, kv_read, len(out.num_scheduled_tokens)


class SimReplica:
    def __init__(self, replica_id: str, scheduler: Scheduler, latency: LatencyModel, *, jump: bool = True):
        self.replica_id = replica_id
        self.scheduler = scheduler
        self.latency = latency
        self.jump = jump
        self.clock = 0.0  # when the engine may start its next step (while a run is pending: the run's start)
        self.busy_time = 0.0
        # A planned run of identical pure-decode steps (its step start times from the clock), not yet
        # applied. It stays pending across unrelated events and is applied at its natural end (a finish, a
        # block event) or when someone needs the engine's state (``materialize``). Every step of a run
        # decodes one token of every running request, so applying k of them is
        # ``commit_decode_run(None, k)``. Read-only outside: ``advance_to(t)`` does nothing while
        # ``pending.last_start >= t - clock`` (a cluster can skip the call).
        self.pending: DecodeRunTimes | None = None

    def add_request(self, request: Request, now: float) -> list[Request]:
        """Queue a request arriving at ``now``; returns requests that finished while catching up to it."""
        finished = self.materialize(now)
        if not (self.scheduler.running or self.scheduler.waiting):  # (not has_work(), inlined)
            # An idle engine starts the next step when work arrives.
            self.clock = max(self.clock, now)
        self.scheduler.add_request(request)
        return finished

    def advance_to(self, t: float) -> list[Request]:
        """Run every step starting before ``t``; return the requests that finished.

        A pending run that goes on past ``t`` is left pending (nothing can finish inside it).
        """
        run = self.pending
        if run is not None and run.last_start >= t - self.clock:
            return []  # the common case: most replicas are inside a run at most events
        finished: list[Request] = []
        sched = self.scheduler
        while True:
            run = self.pending
            if run is not None:
                # t - clock is the deadline from the run's start; its last step starts at last_start.
                if run.last_start >= t - self.clock:
                    return finished
                self.pending = None
                # _commit(None, run.steps, duration), inlined with the same arithmetic: the hot path
                dt = run.start(run.steps)
                end = self.clock + dt
                self.busy_time += dt
                self.clock = end
                finished += sched.commit_decode_run(None, run.steps, end)
                continue
            if not (self.clock < t and (sched.running or sched.waiting)):  # (has_work, inlined)
                return finished
            if self.jump and not sched.waiting:
                planned = sched.schedule_decode_run(self.clock)
                if planned is not None:  # the common step: a pure decode run, planned in one call
                    steps, context = planned
                    if steps > 1:
                        self.pending = self.latency.decode_run_times(len(sched.running), context, steps)
                    else:
                        self._decode_step(context, finished)
                    continue
            out = sched.schedule(self.clock)
            if not out.num_scheduled_tokens and not out.preempted:
                # Nothing can run until something external changes (cannot happen with the shipped
                # policies, which always admit into an empty engine); wait for the next event.
                self.clock = t
                return finished
            self._plan(out, finished)

    def materialize(self, t: float) -> list[Request]:
        """Apply the steps of a pending run that start before ``t``, so the engine's state is current."""
        run = self.pending
        # advance_to(t) does nothing while a run's last step starts at or after t (the usual case here)
        finished = [] if run is not None and run.last_start >= t - self.clock else self.advance_to(t)
        run = self.pending
        if run is not None:
            self.pending = None
            deadline = t - self.clock
            if deadline > 0.0:
                k, dt = run.cut(deadline)  # k >= 1
                finished.extend(self._commit(None, k, dt))
        return finished

    def stats(self, now: float, estimator: Any) -> dict[str, Any]:
        """``engine_stats`` as of ``now``, for a replica advanced to ``now`` (``advance_to(now)``: nothing
        left to finish before ``now``).

        The same as ``materialize(now)`` and then ``engine_stats``, but a pending run's steps that started
        are counted, not applied (module docstring). Counting is exact only while nothing waits (which
        holds during any run that began with an empty queue: arrivals apply the run first); otherwise the
        run is applied.
        """
        run = self.pending
        if run is not None and self.scheduler.waiting:
            finished = self.materialize(now)
            assert not finished, "only a run's last step finishes requests, and it starts at or after now"
            run = None
        if run is None:
            return engine_stats(self.scheduler, estimator, now=now, latency=self.latency)
        # k < run.steps: advance_to(now) applied the run if all its steps start before now
        deadline = now - self.clock
        k = run.cut(deadline)[0] if deadline > 0.0 else 0
        return engine_stats(self.scheduler, estimator, now=now, latency=self.latency, pending_steps=k)

    def run_until_idle(self) -> list[Request]:
        return self.advance_to(math.inf)

    def _plan(self, out: SchedulerOutput, finished: list[Request]) -> None:
        sched = self.scheduler
        # (an admission step is never a run: skip asking)
        steps = sched.decode_run_limit(out) if self.jump and not out.admitted else 1
        if steps > 1 and sched.waiting:
            # Time alone may change a policy's waiting order (aging bounds): end the run there.
            stable = sched.policy_order_stable_until()
            if stable < math.inf:
                steps = self._run_time(out, steps, stable - self.clock)[0] or 1
        if steps > 1:
            self.pending = self.latency.decode_run_times(len(out.num_scheduled_tokens),
                                                         sum(out.computed_before.values()), steps)
            return
        finished.extend(self._commit(out, 1, self.latency.step_time(*step_cost(out))))

    def _decode_step(self, context: int, finished: list[Request]) -> None:
        """Apply a single step from ``schedule_decode_run``: every running request decodes one token."""
        num_seqs = len(self.scheduler.running)
        # step_cost of that step: n = 1 per sequence, so pairs = kv read = context + num_seqs
        after = context + num_seqs
        finished.extend(self._commit(None, 1, self.latency.step_time(num_seqs, after, after)))

    def _run_time(self, out: SchedulerOutput, steps: int, deadline: float) -> tuple[int, float]:
        return self.latency.decode_run(len(out.num_scheduled_tokens), sum(out.computed_before.values()),
                                       steps, deadline)

    def _commit(self, out: SchedulerOutput | None, steps: int, dt: float) -> list[Request]:
        end = self.clock + dt
        self.busy_time += dt
        self.clock = end
        return self.scheduler.commit_decode_run(out, steps, end)
