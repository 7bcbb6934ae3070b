"""Request traces: the shipped production traces (DESIGN.md §8) and a seeded Poisson generator.

Formats (detected by extension, else by the first non-blank line):

* Azure LLM inference CSV (``.csv``): header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (columns matched by
  name, any order), timestamps ``YYYY-MM-DD HH:MM:SS[.fraction]`` (the Azure files use 7 fractional digits;
  a ``T`` separator or a plain number of seconds is accepted too). Parsed to integer nanoseconds, so no
  precision is lost before the arrivals are re-zeroed.
* Mooncake JSONL (``.jsonl``): one object per line with ``timestamp`` (ms from the start),
  ``input_length``, ``output_length`` and optionally ``hash_ids`` (one id per 512-token prompt block, chained:
  two requests sharing their first k ids share their first ``k * 512`` prompt tokens). Other keys are ignored.

Malformed input raises ``ValueError("<file>: line <n>: <what>")``; blank lines are skipped.

``load_trace`` pipeline, in this order::

    parse (cached by file content) -> stable sort by arrival -> zero at the first arrival
    -> window [start_s, start_s + duration_s) on that original timeline -> re-zero at the first kept arrival
    -> divide arrivals by rate_scale -> keep the first ``limit`` -> clamp / clip token counts

Token counts: a 0 prompt or 0 output is clamped to 1 (and counted). ``max_prompt_tokens`` clips the prompt;
``max_total_tokens`` (the model context) clips ``output`` to ``max_total_tokens - 1`` and then the prompt to
``max_total_tokens - output``; a request changed by either is counted once in ``Trace.num_clipped``. A clipped
prompt keeps its first ``ceil(prompt / 512)`` hash ids (the trace's own convention for the last partial block).

``request_id`` is ``"t{i}"`` with ``i`` the request's index in the full, sorted trace: a request keeps its id
whatever window, limit or rate scale selects it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from halffull.loadtest.sim.metrics import percentile

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "BUILTIN_TRACES",
    "TraceRequest",
    "Trace",
    "load_trace",
    "parse_azure_csv",
    "parse_mooncake_jsonl",
    "poisson_trace",
    "trace_summary",
]

TRACE_BLOCK_TOKENS = 512  # Mooncake hash_ids granularity

# loadtest/data/traces/, beside the subpackages: the simulator, the live replay and the experiments all read them.
_TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"
BUILTIN_TRACES: dict[str, Path] = {
    "azure_code": _TRACE_DIR / "AzureLLMInferenceTrace_code.csv",
    "azure_conv": _TRACE_DIR / "AzureLLMInferenceTrace_conv.csv",
    "mooncake_conv": _TRACE_DIR / "mooncake_conversation_trace.jsonl",
    # Azure conv arrivals with reasoning-model prompt / output lengths (make_reasoning_trace.py, README.md there)
    "reasoning_long": _TRACE_DIR / "reasoning_long.csv",
}

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str  # "t{index}" in (sorted) trace order
    arrival_s: float  # seconds from the first request (after rate scaling)
    num_prompt_tokens: int  # >= 1
    num_output_tokens: int  # >= 1
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per 512-token prompt block, chained; () otherwise
    priority: int = 0


class Trace(list):
    """``list[TraceRequest]`` plus what loading changed, for reports.

    Attributes: ``source`` (file path or generator description), ``num_clipped`` (requests whose prompt or
    output was cut by ``max_prompt_tokens`` / ``max_total_tokens``), ``num_zero_prompt`` and
    ``num_zero_output`` (trace rows with 0 prompt / 0 generated tokens, clamped to 1). Slicing gives a plain
    list; the counters describe the list as returned.
    """

    def __init__(self, requests=(), *, source: str = "", num_clipped: int = 0, num_zero_prompt: int = 0,
                 num_zero_output: int = 0):
        super().__init__(requests)
        self.source = source
        self.num_clipped = num_clipped
        self.num_zero_prompt = num_zero_prompt
        self.num_zero_output = num_zero_output


# --------------------------------------------------------------------------------------------------------------
# Parsing. A parsed trace is a tuple of rows (arrival_ns, prompt, output, hash_ids), in file order.

_Row = tuple[int, int, int, tuple[int, ...]]


def _err(source: str, line: int, what: str) -> ValueError:
    return ValueError(f"{source}: line {line}: {what}")


def _parse_count(text: str, source: str, line: int, column: str) -> int:
    text = text.strip()
    # Plain decimal digits only: int() would also take "1_000", "+5" or non-ASCII digits.
    if not (text.isascii() and text.isdigit()):
        if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
            raise _err(source, line, f"{column} is negative: {text!r}")
        raise _err(source, line, f"{column} is not a non-negative integer: {text!r}")
    if len(text) > 18:
        raise _err(source, line, f"{column} is implausibly large: {text[:30]!r}")
    return int(text)


_date_ordinals: dict[str, int] = {}


def _parse_timestamp_ns(text: str, source: str, line: int) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fraction]`` (or ``T`` separator, or plain seconds) -> integer nanoseconds."""
    text = text.strip()
    date, sep, clock = text.partition(" ")
    if not sep:
        date, sep, clock = text.partition("T")
    if not sep:
        return _parse_seconds_ns(text, source, line)
    ordinal = _date_ordinals.get(date)
    if ordinal is None:
        if not (len(date) == 10 and date[4] == "-" and date[7] == "-" and date.replace("-", "").isascii()
                and date.replace("-", "").isdigit()):
            raise _err(source, line, f"bad TIMESTAMP date: {text!r}")
        try:
            ordinal = _dt.date(int(date[:4]), int(date[5:7]), int(date[8:10])).toordinal()
        except ValueError:
            raise _err(source, line, f"bad TIMESTAMP date: {text!r}") from None
        if len(_date_ordinals) < 4096:  # a trace spans a handful of days; bound the memo anyway
            _date_ordinals[date] = ordinal
    whole, _, frac = clock.strip().partition(".")
    parts = whole.split(":")
    if (len(parts) != 3 or not all(len(p) == 2 and p.isascii() and p.isdigit() for p in parts)
            or (frac and not (frac.isascii() and frac.isdigit()))):
        raise _err(source, line, f"bad TIMESTAMP time: {text!r}")
    h, m, s = int(parts[0]), int(parts[1]), int(parts[2])
    if h > 23 or m > 59 or s > 60:  # 60: a leap second
        raise _err(source, line, f"bad TIMESTAMP time: {text!r}")
    frac_ns = int((frac + "000000000")[:9]) if frac else 0
    return ((ordinal * 86400 + h * 3600 + m * 60 + s) * 1_000_000_000) + frac_ns


def _parse_seconds_ns(text: str, source: str, line: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise _err(source, line, f"bad TIMESTAMP: {text!r}") from None
    if not math.isfinite(value) or value < 0 or value > 1e15:
        raise _err(source, line, f"TIMESTAMP out of range: {text!r}")
    return round(value * 1e9)


def parse_azure_csv(text: str, source: str = "<string>") -> tuple[_Row, ...]:
    """Parse Azure LLM inference CSV text into rows ``(arrival_ns, prompt, output, ())`` in file order."""
    lines = text.split("\n")  # not splitlines(): keep file line numbers
    header_index = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if header_index is None:
        raise _err(source, 1, "empty file, expected header " + ",".join(_AZURE_COLUMNS))
    header = [c.strip().lstrip("\ufeff") for c in lines[header_index].split(",")]
    if sorted(header) != sorted(_AZURE_COLUMNS) or len(set(header)) != len(header):
        raise _err(source, header_index + 1, f"bad header {lines[header_index][:80]!r}, expected "
                   + ",".join(_AZURE_COLUMNS))
    i_ts, i_ctx, i_gen = (header.index(c) for c in _AZURE_COLUMNS)
    rows = []
    for index in range(header_index + 1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 3:
            raise _err(source, index + 1, f"expected 3 fields, got {len(fields)}")
        arrival_ns = _parse_timestamp_ns(fields[i_ts], source, index + 1)
        prompt = _parse_count(fields[i_ctx], source, index + 1, "ContextTokens")
        output = _parse_count(fields[i_gen], source, index + 1, "GeneratedTokens")
        rows.append((arrival_ns, prompt, output, ()))
    return tuple(rows)


def _json_int(obj: dict, key: str, source: str, line: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(source, line, f"{key} is not an integer: {value!r:.40}")
    if value < 0:
        raise _err(source, line, f"{key} is negative: {value}")
    if value >= 1 << 62:
        raise _err(source, line, f"{key} is implausibly large")
    return value


def _json_timestamp_ns(value, source: str, line: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(source, line, f"timestamp is not a number: {value!r:.40}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _err(source, line, f"timestamp is not finite: {value}")
    if value < 0:
        raise _err(source, line, f"timestamp is negative: {value}")
    if value > 1e15:  # ms; ~31,000 years
        raise _err(source, line, f"timestamp is implausibly large: {value}")
    return value * 1_000_000 if isinstance(value, int) else round(value * 1e6)


def parse_mooncake_jsonl(text: str, source: str = "<string>") -> tuple[_Row, ...]:
    """Parse Mooncake JSONL text into rows ``(arrival_ns, prompt, output, hash_ids)`` in file order."""
    rows = []
    decode = json.JSONDecoder().decode
    for index, line in enumerate(text.split("\n")):  # file line numbers
        if not line.strip():
            continue
        try:
            obj = decode(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested brackets
            raise _err(source, index + 1, f"invalid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
        if not isinstance(obj, dict):
            raise _err(source, index + 1, f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _MOONCAKE_KEYS if k not in obj]
        if missing:
            raise _err(source, index + 1, f"missing key(s) {', '.join(missing)}")
        arrival_ns = _json_timestamp_ns(obj["timestamp"], source, index + 1)
        prompt = _json_int(obj, "input_length", source, index + 1)
        output = _json_int(obj, "output_length", source, index + 1)
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hash_ids):
            raise _err(source, index + 1, "hash_ids is not a list of integers")
        rows.append((arrival_ns, prompt, output, tuple(hash_ids)))
    return tuple(rows)


def _detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    first = next((ln.strip() for ln in text.split("\n") if ln.strip()), "")
    return "jsonl" if first.startswith("{") else "csv"


_row_cache: dict[tuple[bytes, str], tuple[_Row, ...]] = {}
_ROW_CACHE_SIZE = 8


def _read_rows(path: Path) -> tuple[_Row, ...]:
    """The file's rows, stably sorted by arrival; cached."""
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"trace not found: {source} (builtin names: {', '.join(BUILTIN_TRACES)})")
    # Keyed by a content digest, not mtime: a file rewritten within the filesystem's timestamp granularity
    # must not return stale rows. Rows are immutable tuples, so sharing them between calls is safe.
    key = (hashlib.blake2b(data, digest_size=16).digest(), source)
    rows = _row_cache.get(key)
    if rows is None:
        try:
            text = data.decode("utf-8-sig")  # -sig: drop a leading BOM
        except UnicodeDecodeError as exc:
            raise _err(source, data.count(b"\n", 0, exc.start) + 1, "not valid UTF-8") from None
        parser = parse_azure_csv if _detect_format(path, text) == "csv" else parse_mooncake_jsonl
        rows = tuple(sorted(parser(text, source), key=lambda row: row[0]))  # stable: ties keep file order
        if len(_row_cache) >= _ROW_CACHE_SIZE:
            _row_cache.pop(next(iter(_row_cache)))  # oldest insertion first
        _row_cache[key] = rows
    return rows


# --------------------------------------------------------------------------------------------------------------
# Loading


def _resolve(name_or_path: Union[str, os.PathLike]) -> Path:
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_TRACES:
        return BUILTIN_TRACES[name_or_path]
    return Path(name_or_path)


def _check_args(rate_scale, limit, start_s, duration_s, max_prompt_tokens, max_total_tokens) -> None:
    if not (isinstance(rate_scale, (int, float)) and math.isfinite(rate_scale) and rate_scale > 0):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if max_total_tokens is not None and max_total_tokens < 2:
        raise ValueError(f"max_total_tokens must be >= 2 (one prompt and one output token), got {max_total_tokens}")


def _clip(prompt: int, output: int, max_prompt_tokens: int | None, max_total_tokens: int | None) -> tuple[int, int]:
    if max_prompt_tokens is not None:
        prompt = min(prompt, max_prompt_tokens)
    if max_total_tokens is not None:
        output = min(output, max_total_tokens - 1)  # the output alone must leave one prompt token
        prompt = min(prompt, max_total_tokens - output)
    return prompt, output


def load_trace(name_or_path: Union[str, os.PathLike], *, rate_scale: float = 1.0, limit: int | None = None,
               start_s: float = 0.0, duration_s: float | None = None, max_prompt_tokens: int | None = None,
               max_total_tokens: int | None = None) -> Trace:
    """Load a builtin trace (``azure_code``, ``azure_conv``, ``mooncake_conv``, ``reasoning_long``) or a file.

    See the module docstring for the pipeline. ``rate_scale`` X makes arrivals X times faster (arrival / X).
    The window is applied on the original timeline (seconds after the trace's first request); ``limit`` keeps
    the first N requests after windowing. Returns a fresh ``Trace`` (a list) each call.
    """
    _check_args(rate_scale, limit, start_s, duration_s, max_prompt_tokens, max_total_tokens)
    path = _resolve(name_or_path)
    rows = _read_rows(path)  # sorted by arrival
    trace = Trace(source=str(path))
    if not rows:
        return trace
    t0_ns = rows[0][0]
    start_ns = round(start_s * 1e9)
    end_ns = math.inf if duration_s is None else start_ns + duration_s * 1e9
    first_kept_ns = None
    for index, (arrival_ns, prompt, output, hash_ids) in enumerate(rows):
        if limit is not None and len(trace) >= limit:
            break
        offset_ns = arrival_ns - t0_ns
        if offset_ns < start_ns:
            continue
        if offset_ns >= end_ns:
            break
        if first_kept_ns is None:
            first_kept_ns = offset_ns
        if prompt == 0:
            trace.num_zero_prompt += 1
            prompt = 1
        if output == 0:
            trace.num_zero_output += 1
            output = 1
        clipped_prompt, clipped_output = _clip(prompt, output, max_prompt_tokens, max_total_tokens)
        if (clipped_prompt, clipped_output) != (prompt, output):
            trace.num_clipped += 1
            hash_ids = hash_ids[: -(-clipped_prompt // TRACE_BLOCK_TOKENS)]
        trace.append(TraceRequest(
            request_id=f"t{index}",
            arrival_s=(offset_ns - first_kept_ns) / 1e9 / rate_scale,
            num_prompt_tokens=clipped_prompt,
            num_output_tokens=clipped_output,
            hash_ids=hash_ids,
        ))
    return trace


# --------------------------------------------------------------------------------------------------------------
# Synthetic


LengthSpec = Union[float, Sequence[int]]


def _length_sampler(spec: LengthSpec, sigma: float, rng: random.Random, what: str) -> Callable[[], int]:
    """A number is a lognormal mean (``sigma`` of the underlying normal); a sequence is an empirical
    distribution sampled uniformly (e.g. the prompt lengths of a real trace)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not (math.isfinite(spec) and spec >= 1):
            raise ValueError(f"{what} mean must be >= 1, got {spec!r}")
        if sigma < 0:
            raise ValueError(f"{what} sigma must be >= 0, got {sigma}")
        mu = math.log(spec) - sigma * sigma / 2  # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2) = spec
        return lambda: max(1, round(rng.lognormvariate(mu, sigma)))
    values = list(spec)
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{what} must be a mean >= 1 or a non-empty sequence of ints >= 1")
    return lambda: rng.choice(values)


def poisson_trace(num_requests: int, rate_rps: float, *, prompt_tokens: LengthSpec = 512.0,
                  output_tokens: LengthSpec = 128.0, prompt_sigma: float = 0.5, output_sigma: float = 0.5,
                  seed: int = 0) -> Trace:
    """Poisson arrivals at ``rate_rps`` (exponential gaps, first arrival at 0) with lognormal lengths.

    ``prompt_tokens`` / ``output_tokens``: a mean (lognormal with that mean, underlying-normal sigma
    ``prompt_sigma`` / ``output_sigma``; sigma 0 gives the constant) or a sequence of ints to draw from
    uniformly. Lengths are rounded and at least 1. All draws come from ``random.Random(seed)``, in request
    order (gap, prompt, output), so a seed fixes the trace.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    rng = random.Random(seed)
    draw_prompt = _length_sampler(prompt_tokens, prompt_sigma, rng, "prompt_tokens")
    draw_output = _length_sampler(output_tokens, output_sigma, rng, "output_tokens")
    trace = Trace(source=f"poisson(n={num_requests}, rate={rate_rps}, seed={seed})")
    arrival = 0.0
    for index in range(num_requests):
        if index:
            arrival += rng.expovariate(rate_rps)
        trace.append(TraceRequest(f"t{index}", arrival, draw_prompt(), draw_output()))
    return trace


# --------------------------------------------------------------------------------------------------------------
# Summary


def _repeated_block_fraction(requests: Sequence[TraceRequest]) -> tuple[int, float]:
    """Blocks whose hash id appeared in an earlier request (unbounded cache), over all blocks, in arrival order."""
    seen: set[int] = set()
    total = repeated = 0
    for request in sorted(requests, key=lambda r: r.arrival_s):
        for h in request.hash_ids:
            total += 1
            if h in seen:
                repeated += 1
            else:
                seen.add(h)
    return total, (repeated / total if total else 0.0)


def trace_summary(requests: Sequence[TraceRequest]) -> dict:
    """Count, span, rate and length statistics of a trace (all values finite; zeros when empty).

    ``rate_rps`` is count / span (0 when the span is 0). ``repeated_block_fraction`` is the fraction of
    512-token hash blocks that repeat a block of an earlier request (0 when no request has hash ids).
    Load counters (``num_clipped``, ...) are included when ``requests`` is a ``Trace``.
    """
    n = len(requests)
    arrivals = [r.arrival_s for r in requests]
    span = (max(arrivals) - min(arrivals)) if n else 0.0
    prompts = sorted(r.num_prompt_tokens for r in requests)
    outputs = sorted(r.num_output_tokens for r in requests)
    num_blocks, repeated = _repeated_block_fraction(requests)
    summary = {
        "count": n,
        "duration_s": span,
        "rate_rps": n / span if span > 0 else 0.0,
        "prompt_mean": sum(prompts) / n if n else 0.0,
        "prompt_p50": percentile(prompts, 50, presorted=True),
        "prompt_p99": percentile(prompts, 99, presorted=True),
        "output_mean": sum(outputs) / n if n else 0.0,
        "output_p50": percentile(outputs, 50, presorted=True),
        "output_p99": percentile(outputs, 99, presorted=True),
        "num_hash_blocks": num_blocks,
        "repeated_block_fraction": repeated,
    }
    if isinstance(requests, Trace):
        summary.update(num_clipped=requests.num_clipped, num_zero_prompt=requests.num_zero_prompt,
                       num_zero_output=requests.num_zero_output)
    return summary
