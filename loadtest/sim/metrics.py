"""Serving metrics, one definition everywhere (DESIGN.md §7): simulator, Serve replay and locust all report here.

Per request (``RequestRecord``; all times absolute, on one clock, in seconds):

    TTFT = first_token_s - arrival_s          (a finished request with no first-token time: TTFT = E2E)
    E2E  = finish_s - arrival_s
    TPOT = (E2E - TTFT) / (num_output_tokens - 1)      undefined (None) for 1-token outputs

A request is *completed* when it has a ``finish_s`` and no ``error``; every other record is *failed*
(errored, or never finished). ``summarize`` over records:

    latency stats (mean, p50, p90, p99)   over completed requests; TPOT over those with > 1 output token
    percentiles                            linear interpolation between order statistics (numpy's default)
    duration_s                             given, else last finish - first arrival (over all records)
    throughput_rps, output_tokens_per_s    completed requests / duration, their output tokens / duration
    SLO met                                completed and TTFT <= slo.ttft_s and (TPOT <= slo.tpot_s or
                                           the output is 1 token: no TPOT to miss)
    goodput_rps                            requests meeting the SLO / duration
    slo_attainment                         requests meeting the SLO / all records (failed ones miss it)
    preemptions_per_request                preemptions of completed requests / completed
    prefix_hit_rate                        cached prompt tokens / prompt tokens, over completed requests

Empty input (or nothing completed) gives 0.0 everywhere, never NaN. Saturation (``saturation_rate_scale``):
the highest rate scale at which p99 TTFT meets the SLO, walking up from the lowest scale and stopping at the
first point that misses (so a lucky point above a failing one does not count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["RequestRecord", "Slo", "percentile", "summarize", "format_table", "saturation_rate_scale",
           "SATURATION_MAX_FAILED_FRACTION"]

_STATS = ("mean", "p50", "p90", "p99")
_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))

# A point with more failed requests than this fraction cannot meet a p99 TTFT SLO: failed requests count as
# infinitely late (their TTFT is not in ttft_p99, which covers completed requests only).
SATURATION_MAX_FAILED_FRACTION = 0.01


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    first_token_s: float | None  # absolute times on the same clock as arrival
    finish_s: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    replica: str = ""
    error: str | None = None  # set when it failed

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_s is not None

    @property
    def e2e(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def ttft(self) -> float | None:
        if self.first_token_s is not None:
            return self.first_token_s - self.arrival_s
        return self.e2e  # finished without a first-token time (non-streaming): the first token came at the end

    @property
    def tpot(self) -> float | None:
        e2e, ttft = self.e2e, self.ttft
        if e2e is None or ttft is None or self.num_output_tokens <= 1:
            return None
        return (e2e - ttft) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.100

    def met_by(self, record: RequestRecord) -> bool:
        if not record.completed:
            return False
        tpot = record.tpot
        return record.ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


def percentile(values: Iterable[float], q: float, *, presorted: bool = False) -> float:
    """The q-th percentile (0..100) with linear interpolation, as ``numpy.percentile``'s default; 0.0 if empty."""
    xs = values if presorted else sorted(values)
    n = len(xs)
    if n == 0:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (n - 1) * (q / 100.0)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    t = pos - lo
    a, b = float(xs[lo]), float(xs[hi])
    # numpy's lerp: from the nearer end, so the result is monotone in t and exact at both ends.
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    values.sort()
    out = {f"{prefix}_mean": math.fsum(values) / len(values) if values else 0.0}
    for name, q in _PERCENTILES:
        out[f"{prefix}_{name}"] = percentile(values, q, presorted=True)
    return out


def _duration(records: Sequence[RequestRecord]) -> float:
    finishes = [r.finish_s for r in records if r.finish_s is not None]
    if not records or not finishes:
        return 0.0
    return max(0.0, max(finishes) - min(r.arrival_s for r in records))


def summarize(records: Iterable[RequestRecord], *, slo: Slo = Slo(), duration_s: float | None = None) -> dict:
    """Flat dict of the metrics in the module docstring (seconds, requests, tokens)."""
    records = list(records)
    done = [r for r in records if r.completed]
    duration = _duration(records) if duration_s is None else float(duration_s)
    per_s = (1.0 / duration) if duration > 0 else 0.0
    # Each latency once per record (the properties, without calling each several times: simulator runs
    # summarize tens of thousands of records).
    ttfts, tpots, e2es = [], [], []
    num_good = 0
    for r in done:
        e2e = r.finish_s - r.arrival_s
        ttft = e2e if r.first_token_s is None else r.first_token_s - r.arrival_s
        tpot = (e2e - ttft) / (r.num_output_tokens - 1) if r.num_output_tokens > 1 else None
        ttfts.append(ttft)
        e2es.append(e2e)
        if tpot is not None:
            tpots.append(tpot)
        num_good += ttft <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)  # Slo.met_by
    prompt_tokens = sum(r.num_prompt_tokens for r in done)
    summary: dict = {"completed": len(done), "failed": len(records) - len(done)}
    summary |= _stats("ttft", ttfts)
    summary |= _stats("tpot", tpots)
    summary |= _stats("e2e", e2es)
    summary |= {
        "throughput_rps": len(done) * per_s,
        "output_tokens_per_s": sum(r.num_output_tokens for r in done) * per_s,
        "preemptions_per_request": sum(r.num_preemptions for r in done) / len(done) if done else 0.0,
        "goodput_rps": num_good * per_s,
        "slo_attainment": num_good / len(records) if records else 0.0,
        "prefix_hit_rate": sum(r.num_cached_prompt_tokens for r in done) / prompt_tokens if prompt_tokens else 0.0,
        "duration_s": duration,
        "slo_ttft_s": slo.ttft_s,
        "slo_tpot_s": slo.tpot_s,
    }
    return summary


def format_table(summary: dict) -> str:
    """A compact human table: latency rows in ms, then throughput, preemptions, goodput, prefix hits."""
    g = lambda key: summary.get(key, 0.0) or 0.0  # noqa: E731 - missing keys read as 0
    lines = [f"{'':6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)"]
    for prefix in ("ttft", "tpot", "e2e"):
        cells = "".join(f"{g(f'{prefix}_{s}') * 1e3:>10.1f}" for s in _STATS)
        lines.append(f"{prefix.upper():6}{cells}")
    lines += [
        f"requests     {int(g('completed'))} completed, {int(g('failed'))} failed in {g('duration_s'):.1f} s",
        f"throughput   {g('throughput_rps'):.3f} req/s, {g('output_tokens_per_s'):.1f} output tok/s",
        f"preemptions  {g('preemptions_per_request'):.3f} per request",
        f"goodput      {g('goodput_rps'):.3f} req/s ({g('slo_attainment') * 100:.1f}% meet the SLO)",
        f"prefix hits  {g('prefix_hit_rate') * 100:.1f}% of prompt tokens",
    ]
    return "\n".join(lines)


def _meets_ttft_p99(summary: dict, slo: Slo) -> bool:
    completed, failed = summary.get("completed", 0), summary.get("failed", 0)
    if completed <= 0:
        return False  # nothing finished: a p99 of 0.0 would be a false pass
    if failed > SATURATION_MAX_FAILED_FRACTION * (completed + failed):
        return False
    return summary.get("ttft_p99", math.inf) <= slo.ttft_s


def saturation_rate_scale(points: Sequence[tuple[float, dict]], slo: Slo = Slo()) -> float | None:
    """Highest rate scale x such that x and every lower measured scale meet the p99 TTFT SLO.

    ``points`` are ``(rate_scale, summarize(...))`` pairs in any order. A point meets the SLO when something
    completed, at most ``SATURATION_MAX_FAILED_FRACTION`` of its requests failed and ``ttft_p99 <= slo.ttft_s``.
    Walking up from the lowest scale, the first miss ends the search: a load that passes above a failing one is
    noise, not capacity. None when the lowest scale already misses (or there are no points).
    """
    best = None
    for scale, summary in sorted(points, key=lambda p: p[0]):
        if not _meets_ttft_p99(summary, slo):
            break
        best = scale
    return best
