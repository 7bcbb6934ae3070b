"""Time the operators of one Llama-3-8B layer on this machine with PyTorch, at the grid of the shipped A100
tables, and write them in the format calibrate.py fits: measured tables of our own for a GPU.

    python replicas/sim/op_timing.py --gpu h100 --out DIR              # on a GPU machine: torch only
    python replicas/sim/op_timing.py --device cpu --tiny --out DIR     # a smoke run (tests): small shapes

Then copy the two CSVs into replicas/sim/calibration/ and run ``python -m halffull.replicas.sim.calibrate
--write``: a GPU whose own Llama-3-8B tables are shipped is fitted on them, as A100 is on Vidur's, instead of
being carried over from A100 (calibrate.py).

Needs nothing but PyTorch and the standard library (a lent GPU machine has PyTorch, no network and no halffull
install), so it imports nothing from halffull and runs as a file. Random bf16 weights built from the model's
shapes (``LLAMA3_8B``, checked against profiles.yaml by tests/test_op_timing.py); nothing is downloaded.

What is timed, per layer, in the columns of Vidur's tables (ms):

  ops table, n tokens      emb (lookup of n ids in the 128,256 x 4,096 table), attn_pre_proj (QKV, 4,096 ->
                           6,144), attn_post_proj (4,096 -> 4,096), mlp_up_proj (gate and up, 4,096 -> 28,672),
                           mlp_down_proj (14,336 -> 4,096), input_layernorm and post_attention_layernorm
                           (RMSNorm), attn_rope (rotary on q and k), mlp_act (SiLU(gate) * up), add (residual)
  attention table          attn_prefill: causal attention of a chunk of p tokens from an empty cache (GQA,
                           ``scaled_dot_product_attention``); attn_decode: B sequences, one query each, over
                           c cached tokens; attn_kv_cache_save: writing the K and V of B tokens (decode) or p
                           tokens (prefill) into a cache of slots

The grid is read from the shipped A100 tables beside this file (every n of the 1-GPU ops table; every
attention row), so the two GPUs' rows line up. ``--quick`` keeps a handful of rows (smoke runs).

Each point: 2 warm-up calls, one timed call to size the batches, then ``--batches`` batches of calls lasting
about ``--batch-ms`` each (on a GPU: captured in a CUDA graph, replayed between CUDA events, so kernels and
not launches are timed, as in vLLM's graph-captured steps; perf_counter loops on the CPU); the point is the
median batch's mean. With the defaults an H100 should take a few minutes for the whole grid (not yet run on
one).

Differences from Vidur's profiles, stated rather than hidden: attention is PyTorch's SDPA over contiguous
K/V (Vidur: FlashInfer over a paged cache), bf16 (Vidur: fp16), and the ops are timed one by one (no fusion).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "calibration"
# meta-llama/Meta-Llama-3-8B config.json (profiles.yaml's llama3-8b; tests/test_op_timing.py compares)
LLAMA3_8B = {"hidden_size": 4096, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "ffn_size": 14336,
             "vocab_size": 128256, "num_layers": 32}
OPS = ("emb", "attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "input_layernorm",
       "post_attention_layernorm", "attn_rope", "mlp_act", "add")
ATTENTION_COLUMNS = ("attn_prefill", "attn_decode", "attn_kv_cache_save")
# --tiny (smoke runs on a CPU): a model of the same structure, small enough to build and time in seconds
TINY = {"hidden_size": 256, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64, "ffn_size": 512,
        "vocab_size": 1024, "num_layers": 2}
QUICK_TOKENS = (1, 16, 128)
QUICK_ATTENTION = ((True, 1, 0, 32), (True, 1, 0, 128), (False, 1, 32, 0), (False, 4, 512, 0))


def grid(quick: bool) -> tuple[list[int], list[tuple[bool, int, int, int]]]:
    """(n of the ops table, (is_prefill, batch, context, chunk) of the attention table), from the A100 slices."""
    if quick:
        return list(QUICK_TOKENS), list(QUICK_ATTENTION)
    with (HERE / "a100_llama3-8b_ops.csv").open() as f:
        tokens = sorted({int(r["num_tokens"]) for r in csv.DictReader(f) if r["tp"] == "1"})
    with (HERE / "a100_llama3-8b_attention.csv").open() as f:
        rows = [(r["is_prefill"] == "True", int(r["batch_size"]), int(r["kv_cache_size"]),
                 int(r["prefill_chunk_size"])) for r in csv.DictReader(f)]
    return tokens, rows


class Timer:
    """Mean seconds per call of a zero-argument function (module docstring: warm-up, sized batches, median).

    On a GPU the calls of a batch are captured in a CUDA graph and the graph is replayed between two events, so
    what is timed is the kernels, not Python's launch overhead: vLLM runs decode steps as CUDA graphs, and a
    launch (~5 us) is longer than the smallest kernels here. A call that cannot be captured is timed as a
    plain loop of launches instead (counted in ``loops``; the run's _timing.json reports it).
    """

    def __init__(self, torch, device: str, batch_ms: float, batches: int):
        self.torch, self.cuda = torch, device.startswith("cuda")
        self.batch_s, self.batches = batch_ms / 1e3, batches
        self.loops = 0  # points timed as launch loops (capture failed)

    def _loop(self, fn, calls: int) -> float:
        if self.cuda:
            start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls

    def _graph(self, fn, calls: int):
        """A zero-argument replay of ``calls`` captured calls (PyTorch's recipe: warm up on a side stream)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return graph.replay

    def __call__(self, fn) -> float:
        for _ in range(2):
            fn()
        one = self._loop(fn, 1)
        calls = max(1, min(1000, int(self.batch_s / max(one, 1e-7))))
        if self.cuda:
            try:
                replay = self._graph(fn, calls)
            except RuntimeError:
                self.loops += 1
            else:
                return statistics.median(self._loop(replay, 1) / calls for _ in range(self.batches))
        return statistics.median(self._loop(fn, calls) for _ in range(self.batches))


class Layer:
    """Random bf16 weights and inputs of one Llama-3-8B layer; ``op(name, n)`` is a zero-argument call."""

    def __init__(self, torch, device: str, dtype, shapes: dict = LLAMA3_8B):
        self.torch, self.F, self.device, self.dtype = torch, torch.nn.functional, device, dtype
        s = shapes
        self.h, self.q, self.kv, self.d, self.ffn = (s["hidden_size"], s["num_q_heads"], s["num_kv_heads"],
                                                     s["head_dim"], s["ffn_size"])
        w = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 0.02  # noqa: E731
        self.emb = w(s["vocab_size"], self.h)
        self.w_qkv, self.w_o = w((self.q + 2 * self.kv) * self.d, self.h), w(self.h, self.q * self.d)
        self.w_up, self.w_down = w(2 * self.ffn, self.h), w(self.h, self.ffn)
        self.norm = torch.ones(self.h, device=device, dtype=dtype)
        self.gqa = self._native_gqa()

    def _rms_norm(self, x):
        if hasattr(self.F, "rms_norm"):
            return self.F.rms_norm(x, (self.h,), self.norm, 1e-5)
        return x * self.torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * self.norm

    def _rope(self, q, k, cos, sin):
        def rotate(x):
            half = x.shape[-1] // 2
            return self.torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def op(self, name: str, n: int):
        torch, F, dev, dt = self.torch, self.F, self.device, self.dtype
        x = torch.randn(n, self.h, device=dev, dtype=dt)
        if name == "emb":
            ids = torch.randint(0, self.emb.shape[0], (n,), device=dev)
            return lambda: F.embedding(ids, self.emb)
        if name == "attn_pre_proj":
            return lambda: F.linear(x, self.w_qkv)
        if name == "attn_post_proj":
            return lambda: F.linear(x, self.w_o)
        if name == "mlp_up_proj":
            return lambda: F.linear(x, self.w_up)
        if name == "mlp_down_proj":
            act = torch.randn(n, self.ffn, device=dev, dtype=dt)
            return lambda: F.linear(act, self.w_down)
        if name in ("input_layernorm", "post_attention_layernorm"):
            return lambda: self._rms_norm(x)
        if name == "attn_rope":
            q = torch.randn(n, self.q, self.d, device=dev, dtype=dt)
            k = torch.randn(n, self.kv, self.d, device=dev, dtype=dt)
            cos = torch.randn(n, 1, self.d, device=dev, dtype=dt)
            sin = torch.randn(n, 1, self.d, device=dev, dtype=dt)
            return lambda: self._rope(q, k, cos, sin)
        if name == "mlp_act":
            gate_up = torch.randn(n, 2 * self.ffn, device=dev, dtype=dt)
            return lambda: F.silu(gate_up[:, :self.ffn]) * gate_up[:, self.ffn:]
        if name == "add":
            r = torch.randn(n, self.h, device=dev, dtype=dt)
            return lambda: x + r
        raise ValueError(f"unknown op {name!r}")

    def _native_gqa(self) -> bool:
        """Whether SDPA takes the grouped KV heads as they are (torch >= 2.5: ``enable_gqa``) on this device;
        probed once, so that no call inside a CUDA graph capture can fail over."""
        t = lambda h: self.torch.randn(1, h, 4, self.d, device=self.device, dtype=self.dtype)  # noqa: E731
        try:
            self.F.scaled_dot_product_attention(t(self.q), t(self.kv), t(self.kv), is_causal=True, enable_gqa=True)
        except (TypeError, RuntimeError):
            return False
        return True

    def _sdpa(self, q, k, v, causal: bool):
        if self.gqa:
            return self.F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        rep = self.q // self.kv  # repeat the KV heads (what torch < 2.5 needs)
        return self.F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                   is_causal=causal)

    def attention(self, is_prefill: bool, batch: int, context: int, chunk: int) -> dict:
        """Zero-argument calls for the attention columns of one row (attn_prefill 0 on decode rows, and the
        other way round, as in Vidur's table)."""
        torch, dev, dt = self.torch, self.device, self.dtype
        rnd = lambda *shape: torch.randn(*shape, device=dev, dtype=dt)  # noqa: E731
        tokens = chunk if is_prefill else batch
        cache = torch.zeros(max(tokens + context * batch, 1), 2, self.kv, self.d, device=dev, dtype=dt)
        slots = torch.randperm(cache.shape[0], device=dev)[:tokens]
        new_kv = rnd(tokens, 2, self.kv, self.d)
        calls = {"attn_kv_cache_save": lambda: cache.index_copy_(0, slots, new_kv)}
        if is_prefill:
            q, k, v = rnd(1, self.q, chunk, self.d), rnd(1, self.kv, chunk, self.d), rnd(1, self.kv, chunk, self.d)
            calls["attn_prefill"] = lambda: self._sdpa(q, k, v, True)
        else:
            q = rnd(batch, self.q, 1, self.d)
            k, v = rnd(batch, self.kv, context, self.d), rnd(batch, self.kv, context, self.d)
            calls["attn_decode"] = lambda: self._sdpa(q, k, v, False)
        return calls


def measure(args: argparse.Namespace) -> dict:
    import torch  # only here: importing this module (tests, the grid) needs no torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shapes = TINY if args.tiny else LLAMA3_8B
    layer, timer = Layer(torch, device, torch.bfloat16, shapes), Timer(torch, device, args.batch_ms, args.batches)
    tokens, attention = grid(args.quick or args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name, start = f"{args.gpu}_llama3-8b", time.time()
    with torch.inference_mode():
        ops_rows = []
        for i, n in enumerate(tokens):
            ops_rows.append([1, n] + [round(timer(layer.op(op, n)) * 1e3, 6) for op in OPS])
            _progress("ops", i + 1, len(tokens), start)
        att_rows = []
        for i, (is_prefill, batch, context, chunk) in enumerate(attention):
            calls = layer.attention(is_prefill, batch, context, chunk)
            ms = [round(timer(calls[c]) * 1e3, 6) if c in calls else 0.0 for c in ATTENTION_COLUMNS]
            att_rows.append([is_prefill, batch, context, chunk] + ms)
            _progress("attention", i + 1, len(attention), start)
            del calls
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    _write(out / f"{name}_ops.csv", ["tp", "num_tokens", *OPS], ops_rows)
    _write(out / f"{name}_attention.csv", ["is_prefill", "batch_size", "kv_cache_size", "prefill_chunk_size",
                                           *ATTENTION_COLUMNS], att_rows)
    meta = {"gpu": args.gpu, "device": device, "device_name": _device_name(torch, device), "torch": torch.__version__,
            "dtype": "bfloat16", "python": platform.python_version(), "quick": args.quick or args.tiny,
            "shapes": "tiny (smoke run: not a calibration)" if args.tiny else "llama3-8b",
            "batch_ms": args.batch_ms, "batches": args.batches, "seconds": round(time.time() - start, 1),
            "timing": "CUDA graph replays" if device.startswith("cuda") else "perf_counter loops",
            "attention": "SDPA, grouped KV heads " + ("native (enable_gqa)" if layer.gqa else "repeated"),
            "points_timed_as_launch_loops": timer.loops,
            "command": "python replicas/sim/op_timing.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "rows": {"ops": len(ops_rows), "attention": len(att_rows)}}
    (out / f"{name}_timing.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _device_name(torch, device: str) -> str:
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or platform.machine())


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _progress(what: str, done: int, total: int, start: float) -> None:
    if done == total or done % 50 == 0:
        print(f"[op_timing] {what} {done}/{total}  {time.time() - start:.0f}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="op_timing.py", description=__doc__.split("\n")[0])
    p.add_argument("--gpu", default="h100", help="profile name the files are written for (h100, h200, a100, ...)")
    p.add_argument("--out", required=True, help="directory for <gpu>_llama3-8b_{ops,attention}.csv and _timing.json")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="a handful of rows (smoke run)")
    p.add_argument("--tiny", action="store_true", help="small shapes and a handful of rows (smoke run on a CPU)")
    p.add_argument("--batch-ms", type=float, default=5.0, help="length of one timed batch of calls (default 5)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per point; the median counts (default 3)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.batch_ms <= 0 or args.batches < 1:
        p.error("--batch-ms must be > 0 and --batches >= 1")
    meta = measure(args)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
