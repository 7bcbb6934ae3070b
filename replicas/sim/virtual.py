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

    def add_request(self, request: Request, now: float) -> None:
        if not self.scheduler.has_work():
            # An idle engine starts the next step when work arrives.
            self.clock = max(self.clock, now)
        self.scheduler.add_request(request)

    def advance_to(self, t: float) -> list[Request]:
        """Run every step starting before ``t``; return the requests that finished."""
        finished: list[Request] = []
        sched = self.scheduler
        while self.clock < t and sched.has_work():
            out = sched.schedule(self.clock)
            if out.is_empty and not out.preempted:
                # Nothing can run until something external changes (cannot happen with the shipped
                # policies, which always admit into an empty engine); wait for the next event.
                self.clock = t
                break
            finished.extend(self._execute(out, t))
        return finished

    def run_until_idle(self) -> list[Request]:
        return self.advance_to(math.inf)

    def _execute(self, out: SchedulerOutput, t: float) -> list[Request]:
        sched = self.scheduler
        num_steps = sched.decode_run_limit(out) if self.jump else 1
        if num_steps > 1:
            deadline = min(t, sched.policy_order_stable_until()) - self.clock
            num_steps, dt = self.latency.decode_run(
                len(out.num_scheduled_tokens), sum(out.computed_before.values()), num_steps, deadline
            )
        else:
            dt = self.latency.step_time(*step_cost(out))
        end = self.clock + dt
        self.busy_time += dt
        self.clock = end
        return sched.commit_decode_run(out, num_steps, end)
