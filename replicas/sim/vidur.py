"""Vidur's measured operator timings, as shipped slices, and the measured step times composed from them.

Source: microsoft/vidur ``data/profiling/`` (MIT; calibration/LICENSE and calibration/SOURCES.md beside this
file): per-operator times measured on real GPUs (Sarathi-Serve engine, FlashInfer attention, fp16), in ms per
layer. ``make_slices`` cuts the full tables (``../shared/calibration/vidur`` in CI) down to the rows the fit
reads and writes them to ``calibration/``; everything else here reads only those slices, so the fit and its
tests run on a fresh clone.

Measured step (``reference_rows``), one row per measured batch, per step (all L layers):

    linear       L * (attn_pre_proj + attn_post_proj + mlp_up_proj + mlp_down_proj)(n)
    elementwise  L * (input_layernorm + post_attention_layernorm + attn_rope + mlp_act + add)(n) + emb(n)
    attention    L * attn_prefill(p)                     prefill row (chunk p from an empty cache)
                 L * 1.1 * attn_decode(B, c)             decode row (Vidur's batching-overhead factor 1.1)
    kv_write     L * attn_kv_cache_save(B, c)            decode rows only

with n = p (prefill) or B (decode), the linear and elementwise ops read at exactly n tokens (rows whose n the
op table lacks are skipped, never interpolated). Left out, on purpose: the prefill rows' kv_cache_save (about
7.5 GB/s, 73 ms of a 4k prefill: an artifact of the profiled engine's prefill path -- its decode path saves a
token ~40x faster, and vLLM writes prefill and decode KV with one kernel), the LM head and the engine's CPU
overhead (not in these tables). The latency model's own terms stand in for those in a whole-step comparison.

Row in halffull's step terms: a prefill of p tokens is n = p, pairs = p(p+1)/2, kv read = p, 1 sequence; a
decode of B sequences at cached context c is n = B, pairs = kv read = B(c+1), B sequences.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_DIR = Path(__file__).with_name("calibration")
LAYERS = 32  # Llama-3-8B and Llama-2-7B, the profiled models
DECODE_BATCHING_OVERHEAD = 1.1  # Vidur multiplies measured decode attention by this (mixed-length batches)
LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
LAYER_ELEMENTWISE_OPS = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")
OPS = ("emb",) + LINEAR_OPS + LAYER_ELEMENTWISE_OPS
ATTENTION_COLUMNS = ("attn_prefill", "attn_decode", "attn_kv_cache_save")
# Shipped slices: name -> (source path under the vidur folder, what to keep)
OPS_TABLES = {
    "a100_llama3-8b": "a100/Meta-Llama-3-8B/mlp.csv",
    "a100_llama2-7b": "a100/Llama-2-7b-hf/mlp.csv",
    "h100_llama2-7b": "h100/Llama-2-7b-hf/mlp.csv",
}
ALL_REDUCE_TABLES = {"a100": "network/a100_dgx/all_reduce.csv", "h100": "network/h100_dgx/all_reduce.csv"}
MAX_TOKENS = 16384  # op rows kept at 1 GPU: every num_tokens up to here (the fit's knot range)
TP_TOKENS = tuple(2**k for k in range(15))  # op rows kept at 2, 4, 8 GPUs (a check of the tp shapes)
ALL_REDUCE_EVERY = 16  # keep every 16th message size (62 of 993 per GPU count), plus the largest


@dataclass(frozen=True)
class Row:
    """One measured batch: its step terms and the measured seconds per operator group (whole step)."""

    regime: str  # "prefill" | "decode"
    label: str
    num_tokens: int
    attn_pairs: int
    kv_tokens: int
    num_seqs: int
    context: int  # prefill: 0; decode: cached tokens per sequence (Vidur's kv_cache_size)
    measured: dict[str, float] = field(hash=False)

    @property
    def total(self) -> float:
        return sum(self.measured.values())


def _median_columns(row: dict, names: tuple[str, ...]) -> list[float]:
    return [float(row[f"time_stats.{name}.median"]) for name in names]


def _write(path: Path, header: list[str], rows: list[list]) -> int:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path.stat().st_size


def _mean_by_key(rows: list[tuple[tuple, list[float]]]) -> list[list]:
    """Average the values of rows sharing a key (the tables repeat some measurements); sorted by key."""
    groups: dict[tuple, list[list[float]]] = defaultdict(list)
    for key, values in rows:
        groups[key].append(values)
    return [list(key) + [round(statistics.fmean(col), 6) for col in zip(*groups[key])] for key in sorted(groups)]


def make_slices(src: Path, dst: Path = SHIPPED_DIR) -> dict[str, int]:
    """Cut the full Vidur tables under ``src`` to the shipped slices in ``dst``; returns file -> bytes."""
    sizes = {}
    for name, rel in OPS_TABLES.items():
        kept = []
        for r in csv.DictReader((src / rel).open()):
            tp, n = int(r["num_tensor_parallel_workers"]), int(r["num_tokens"])
            if (tp == 1 and n <= MAX_TOKENS) or (tp > 1 and n in TP_TOKENS):
                kept.append(((tp, n), _median_columns(r, OPS)))
        sizes[f"{name}_ops.csv"] = _write(dst / f"{name}_ops.csv", ["tp", "num_tokens", *OPS], _mean_by_key(kept))
    kept = []
    for r in csv.DictReader((src / "a100/Meta-Llama-3-8B/attention.csv").open()):
        key = (r["is_prefill"] == "True", int(r["batch_size"]), int(r["kv_cache_size"]), int(r["prefill_chunk_size"]))
        kept.append((key, _median_columns(r, ATTENTION_COLUMNS)))
    header = ["is_prefill", "batch_size", "kv_cache_size", "prefill_chunk_size", *ATTENTION_COLUMNS]
    sizes["a100_llama3-8b_attention.csv"] = _write(dst / "a100_llama3-8b_attention.csv", header, _mean_by_key(kept))
    for gpu, rel in ALL_REDUCE_TABLES.items():
        rows = [r for r in csv.DictReader((src / rel).open()) if r["num_workers"] == r["devices_per_node"]]
        all_sizes = sorted({int(r["size"]) for r in rows})
        keep = set(all_sizes[::ALL_REDUCE_EVERY]) | {all_sizes[-1]}
        kept = [((int(r["num_workers"]), int(r["size"])), _median_columns(r, ("all_reduce",)))
                for r in rows if int(r["size"]) in keep]
        sizes[f"{gpu}_all_reduce.csv"] = _write(dst / f"{gpu}_all_reduce.csv", ["num_workers", "size_bytes",
                                                                                 "all_reduce"], _mean_by_key(kept))
    return sizes


def read_ops(name: str, tp: int = 1, directory: Path = SHIPPED_DIR) -> dict[int, dict[str, float]]:
    """num_tokens -> {op: seconds per layer} of one shipped op table at ``tp`` GPUs."""
    table = {}
    for r in csv.DictReader((directory / f"{name}_ops.csv").open()):
        if int(r["tp"]) == tp:
            table[int(r["num_tokens"])] = {op: float(r[op]) * 1e-3 for op in OPS}
    return table


def read_attention(directory: Path = SHIPPED_DIR, name: str = "a100_llama3-8b") -> list[dict]:
    """Rows of one shipped attention table (times in seconds per layer): Vidur's A100 Llama-3-8B, or a GPU's
    own (op_timing.py)."""
    rows = []
    for r in csv.DictReader((directory / f"{name}_attention.csv").open()):
        row = {k: int(r[k]) for k in ("batch_size", "kv_cache_size", "prefill_chunk_size")}
        row |= {k: float(r[k]) * 1e-3 for k in ATTENTION_COLUMNS}
        rows.append(row | {"is_prefill": r["is_prefill"] == "True"})
    return rows


def read_all_reduce(gpu: str, directory: Path = SHIPPED_DIR) -> dict[int, list[tuple[int, float]]]:
    """GPU count -> [(message bytes, seconds)] of one shipped all-reduce table (one node)."""
    table: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in csv.DictReader((directory / f"{gpu}_all_reduce.csv").open()):
        table[int(r["num_workers"])].append((int(r["size_bytes"]), float(r["all_reduce"]) * 1e-3))
    return dict(table)


def _layer_groups(op: dict[str, float]) -> dict[str, float]:
    """Whole-step linear and elementwise seconds from one op-table row (module docstring)."""
    return {
        "linear": LAYERS * sum(op[name] for name in LINEAR_OPS),
        "elementwise": LAYERS * sum(op[name] for name in LAYER_ELEMENTWISE_OPS) + op["emb"],
    }


def has_tables(name: str, directory: Path = SHIPPED_DIR) -> bool:
    """Whether both an ops and an attention table of ``name`` (e.g. "h100_llama3-8b") are shipped."""
    return (directory / f"{name}_ops.csv").is_file() and (directory / f"{name}_attention.csv").is_file()


def reference_rows(directory: Path = SHIPPED_DIR, name: str = "a100_llama3-8b") -> list[Row]:
    """Every measured Llama-3-8B batch of one GPU's tables (module docstring), prefill rows first."""
    ops = read_ops(name, 1, directory)
    rows = []
    for a in read_attention(directory, name):
        n = a["prefill_chunk_size"] if a["is_prefill"] else a["batch_size"]
        if n not in ops:
            continue
        groups = _layer_groups(ops[n])
        if a["is_prefill"]:
            groups["attention"] = LAYERS * a["attn_prefill"]
            rows.append(Row("prefill", f"prefill {n}", n, n * (n + 1) // 2, n, 1, 0, groups))
        else:
            c = a["kv_cache_size"]
            groups["attention"] = LAYERS * DECODE_BATCHING_OVERHEAD * a["attn_decode"]
            groups["kv_write"] = LAYERS * a["attn_kv_cache_save"]
            rows.append(Row("decode", f"decode B={n} c={c}", n, n * (c + 1), n * (c + 1), n, c, groups))
    return sorted(rows, key=lambda r: (r.regime != "prefill", r.context, r.num_tokens))
