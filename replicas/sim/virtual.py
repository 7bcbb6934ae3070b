"""One simulated replica on a virtual clock (discrete events, deterministic).

The engine core schedules; instead of running a model, the executor advances the replica's clock by the
latency model's step time. ``advance_to(t)`` runs every step that *starts* before ``t``; a request added at
``t`` is first seen by the step starting at or after ``t``.

Runs of identical pure-decode steps are applied in one go (``jump=True``): the scheduler says how many steps
are certain to repeat (no finish, no failed allocation, no admission change), the latency model sums their
durations in closed form and stops at the deadline. ``jump=False`` steps one token at a time; both give the
same per-request results (tests/test_sim_equivalence.py).
"""

from __future__ import annotations

import math

from replicas.engine.request import Request
from replicas.engine.scheduler import Scheduler, SchedulerOutput
from replicas.sim.latency import LatencyModel


def step_cost(out: SchedulerOutput) -> tuple[int, int, int]:
    """(tokens computed, attention pairs, KV tokens read) of one step."""
    num_tokens = attn_pairs = kv_read = 0
    computed_before = out.computed_before
    for request, n in out.num_scheduled_tokens.items():
        c = computed_before[request]
        num_tokens += n
        attn_pairs += n * c + n * (n + 1) // 2
        kv_read += c + n
    return num_tokens, attn_pairs, kv_read


class SimReplica:
    def __init__(self, replica_id: str, scheduler: Scheduler, latency: LatencyModel, *, jump: bool = True):
        self.replica_id = replica_id
        self.scheduler = scheduler
        self.latency = latency
        self.jump = jump
        self.clock = 0.0  # when the engine may start its next step
        self.busy_time = 0.0
        # A planned run of identical decode steps, not yet applied: (first step's output, steps, start time).
        # It stays pending across unrelated events and is applied at its natural end (a finish, a block
        # event) or when someone needs the engine's state (``materialize``).
        self._run: tuple[SchedulerOutput, int, float] | None = None

    def add_request(self, request: Request, now: float) -> list[Request]:
        """Queue a request arriving at ``now``; returns requests that finished while catching up to it."""
        finished = self.materialize(now)
        if not self.scheduler.has_work():
            # An idle engine starts the next step when work arrives.
            self.clock = max(self.clock, now)
        self.scheduler.add_request(request)
        return finished

    def advance_to(self, t: float) -> list[Request]:
        """Run every step starting before ``t``; return the requests that finished.

        A pending decode run that goes on past ``t`` is left pending (nothing can finish inside it).
        """
        finished: list[Request] = []
        sched = self.scheduler
        while True:
            if self._run is not None:
                if not self._finish_run(t, finished):
                    return finished
                continue
            if not (self.clock < t and sched.has_work()):
                return finished
            out = sched.schedule(self.clock)
            if out.is_empty and not out.preempted:
                # Nothing can run until something external changes (cannot happen with the shipped
                # policies, which always admit into an empty engine); wait for the next event.
                self.clock = t
                return finished
            self._plan(out, finished)

    def materialize(self, t: float) -> list[Request]:
        """Apply the steps of a pending run that start before ``t``, so the engine's state is current."""
        finished = self.advance_to(t)
        if self._run is not None:
            out, steps, start = self._run
            self._run = None
            k, dt = self._run_time(out, steps, t - start)
            finished.extend(self._commit(out, k, dt))
        return finished

    def run_until_idle(self) -> list[Request]:
        return self.advance_to(math.inf)

    def _plan(self, out: SchedulerOutput, finished: list[Request]) -> None:
        sched = self.scheduler
        steps = sched.decode_run_limit(out) if self.jump else 1
        if steps > 1:
            # Time alone may change a policy's waiting order (aging bounds): end the run there.
            stable = sched.policy_order_stable_until()
            if stable < math.inf:
                steps = self._run_time(out, steps, stable - self.clock)[0] or 1
        if steps > 1:
            self._run = (out, steps, self.clock)
            return
        finished.extend(self._commit(out, 1, self.latency.step_time(*step_cost(out))))

    def _finish_run(self, t: float, finished: list[Request]) -> bool:
        """Apply the pending run if all its steps start before ``t``; False if it goes on past ``t``."""
        out, steps, start = self._run
        k, dt = self._run_time(out, steps, t - start)
        if k < steps:
            return False
        self._run = None
        finished.extend(self._commit(out, steps, dt))
        return True

    def _run_time(self, out: SchedulerOutput, steps: int, deadline: float) -> tuple[int, float]:
        return self.latency.decode_run(len(out.num_scheduled_tokens), sum(out.computed_before.values()),
                                       steps, deadline)

    def _commit(self, out: SchedulerOutput, steps: int, dt: float) -> list[Request]:
        end = self.clock + dt
        self.busy_time += dt
        self.clock = end
        return self.scheduler.commit_decode_run(out, steps, end)
