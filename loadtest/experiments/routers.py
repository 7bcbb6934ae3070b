"""sal ÷ pow2 with N routers (one per ingress replica), and the ablation of each many-router mechanism.

    python -m halffull.loadtest.experiments.routers [--out docs/results] [--jobs 1] [--limit 6000]
                                                    [--routers 1,2,4,8,16] [--no-ablations]

Setups (H100, llama3-8b, fcfs, stats period 0.5 s delivered ``STATS_DELAY_S`` later, peer bookings
``PEER_DELAY_S`` later, seed 0, first ``limit`` requests):

    azure4      Azure conversation x14, 4 replicas
    azure16     Azure conversation x40, 16 replicas
    mooncake4   Mooncake conversation x4.5, 4 replicas (prefix_aware too: the prefix-affinity baseline)

For each setup and each number of routers, one run per policy with default parameters; the ablations (8
routers) switch off one mechanism of sal at a time. Writes ``routers.csv`` (one row per run),
``routers_table.md`` (the table, ratios to pow2 at the same N), ``routers_ratio.png`` (sal ÷ pow2, p99 and
mean TTFT, by N) and ``routers_traffic.md`` (what the published feed adds to the stats, per publication and per
request, from the JSON size of the simulator's publications, and the peer bookings' datagrams, sal with 8
routers). docs/results/routers.md holds
them with the commentary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor

from halffull.loadtest.sim.cluster import ClusterConfig, ClusterSim, load_trace_for
from halffull.router import peers
from halffull.router.feed import NUM_RECEIVED, RECENT_PREFIX_HASHES

_TOKEN = "0" * 32  # a receiver's token as the link sends it (128 bits, hex)

SETUPS = {
    "azure4": ("azure_conv", 14.0, 4),
    "azure16": ("azure_conv", 40.0, 16),
    "mooncake4": ("mooncake_conv", 4.5, 4),
}
SERVE_BROADCAST_LAG_S = 0.010  # peer bookings over a Serve broadcast per batch: measured median (deploy/peer_link.py)
ABLATIONS = {  # label -> (sal params, cluster overrides): each switches one mechanism off
    "sal, single-router rule (no bookings, K=1, no spread, local prefixes)": (
        {"peer_bookings": False, "delta_scale": 1.0, "spread": 0.0, "use_published_prefixes": False}, {}),
    "sal, no peer bookings (stats only: share-scaled deltas, water-filled pick)": ({"peer_bookings": False}, {}),
    "sal, no peer bookings, no share-scaled deltas (K=1)": ({"peer_bookings": False, "delta_scale": 1.0}, {}),
    "sal, peer bookings at a Serve broadcast's lag (10 ms)": ({}, {"peer_delay_s": SERVE_BROADCAST_LAG_S}),
    "sal, no in-transit spread (spread 0)": ({"spread": 0.0}, {}),
    "sal, no published prefixes": ({"use_published_prefixes": False}, {}),
    "sal + power of 2 (sample_size 2)": ({"sample_size": 2}, {}),
    "sal, spread among all prefix holders (spread_pool holders)": ({"spread_pool": "holders"}, {}),
}
FIELDS = ("setup", "routers", "label", "ttft_p99", "ttft_mean", "prefix_hit_rate", "throughput_rps")


def plan(routers: list[int], ablations: bool) -> list[tuple]:
    """(setup, N, label, router, params, cluster overrides) of every run."""
    runs = []
    for setup in SETUPS:
        policies = ["pow2", "sal"] + (["prefix_aware"] if setup.startswith("mooncake") else [])
        for n in routers:
            runs += [(setup, n, p, p, {}, {}) for p in policies]
        if ablations:
            runs += [(setup, 8, label, "sal", params, over) for label, (params, over) in ABLATIONS.items()]
    return runs


def run_one(args: tuple) -> dict:
    setup, n, label, router, params, over, limit = args
    trace, scale, replicas = SETUPS[setup]
    cfg = ClusterConfig(num_replicas=replicas, router=router, router_params=params, num_routers=n, **over)
    summary = ClusterSim(cfg).run(load_trace_for(cfg, trace, rate_scale=scale, limit=limit)).summary
    return {"setup": setup, "routers": n, "label": label} | {k: summary[k] for k in FIELDS[3:]}


class _MeteredSim(ClusterSim):
    """A ClusterSim that measures the JSON size of every publication, with and without the feed keys, and of
    every peer booking as the live link sends it (one booking per datagram: the most datagrams and bytes, since
    live bookings posted in the same loop step share one)."""

    def __init__(self, cfg: ClusterConfig):
        super().__init__(cfg)
        self.meter = {"publications": 0, "stats_bytes": 0, "feed_bytes": 0, "hashes": 0, "bookings": 0,
                      "booking_bytes": 0}

    def route(self, tr, index: int) -> str:
        transit = self.peer_transit
        last = transit[-1] if transit else None
        replica_id = super().route(tr, index)
        if transit and transit[-1] is not last:  # this decision's booking (route adds at most one)
            self.meter["bookings"] += 1
            self.meter["booking_bytes"] += len(peers.encode(_TOKEN, [transit[-1][2]]))
        return replica_id

    def publish(self, now: float) -> None:
        super().publish(now)
        latest = self.in_transit[-1][1] if self.in_transit else self.published
        m = self.meter
        for _, stats in latest:
            feed = {NUM_RECEIVED: stats[NUM_RECEIVED], RECENT_PREFIX_HASHES: stats[RECENT_PREFIX_HASHES]}
            m["publications"] += 1
            m["stats_bytes"] += len(json.dumps(stats, separators=(",", ":")))
            m["feed_bytes"] += len(json.dumps(feed, separators=(",", ":")))
            m["hashes"] += len(stats[RECENT_PREFIX_HASHES])


def traffic(setup: str, n: int, limit: int) -> dict:
    """Cross-router traffic of sal with ``n`` routers: what the feed adds to the stats every router receives,
    and the peer bookings.

    Each publication of each replica reaches each of the ``n`` routers (Serve's long-poll broadcast, which exists
    without the feed): the feed adds no message, only bytes. Each routed request's booking goes to the ``n - 1``
    other routers: at most ``n - 1`` datagrams per request (fewer when bookings share a datagram), plus each
    link's hello, a Serve broadcast to the ``n`` ingress replicas every ``HELLO_EVERY_S`` (3 s).
    """
    trace, scale, replicas = SETUPS[setup]
    cfg = ClusterConfig(num_replicas=replicas, router="sal", num_routers=n)
    sim = _MeteredSim(cfg)
    requests = len(sim.run(load_trace_for(cfg, trace, rate_scale=scale, limit=limit)).records)
    m = sim.meter
    pubs = m["publications"]
    return {"setup": setup, "routers": n, "requests": requests, "publications": pubs,
            "stats_bytes_per_pub": m["stats_bytes"] / pubs, "feed_bytes_per_pub": m["feed_bytes"] / pubs,
            "hashes_per_pub": m["hashes"] / pubs, "feed_bytes_per_request_per_router": m["feed_bytes"] / requests,
            "deliveries_per_request": pubs * n / requests,
            "booking_bytes": m["booking_bytes"] / max(m["bookings"], 1),
            "datagrams_per_request": m["bookings"] * (n - 1) / requests}


def traffic_table(rows: list[dict]) -> str:
    out = ["| setup | routers | publications per request, all routers | stats bytes / publication | of which feed "
           "| prefix hashes / publication | feed bytes per request, per router | feed bytes per request, all routers "
           "| booking datagrams per request (at most) | bytes per booking datagram |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setup']} | {r['routers']} | {r['deliveries_per_request']:.2f} | "
                   f"{r['stats_bytes_per_pub']:.0f} | {r['feed_bytes_per_pub']:.0f} | {r['hashes_per_pub']:.1f} | "
                   f"{r['feed_bytes_per_request_per_router']:.0f} | "
                   f"{r['feed_bytes_per_request_per_router'] * r['routers']:.0f} | "
                   f"{r['datagrams_per_request']:.1f} | {r['booking_bytes']:.0f} |")
    return "\n".join(out) + "\n"


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per setup and N, each policy's p99 / mean TTFT and its ratio to pow2 at the same N."""
    base = {(r["setup"], r["routers"]): r for r in rows if r["label"] == "pow2"}
    out = ["| setup | routers | policy | p99 TTFT s | mean TTFT s | p99 ÷ pow2 | mean ÷ pow2 | prefix hits |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["setup"], r["routers"]))
        if b is None:
            continue
        out.append(f"| {r['setup']} | {r['routers']} | {r['label']} | {r['ttft_p99']:.3f} | {r['ttft_mean']:.3f} "
                   f"| {r['ttft_p99'] / b['ttft_p99']:.2f} | {r['ttft_mean'] / b['ttft_mean']:.2f} "
                   f"| {r['prefix_hit_rate']:.3f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for metric, ax in zip(("ttft_p99", "ttft_mean"), axes):
        for setup in SETUPS:
            base = {r["routers"]: r[metric] for r in rows if r["setup"] == setup and r["label"] == "pow2"}
            sal = sorted((r["routers"], r[metric] / base[r["routers"]]) for r in rows
                         if r["setup"] == setup and r["label"] == "sal" and r["routers"] in base)
            if sal:
                ax.plot(*zip(*sal), marker="o", label=setup)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("routers (ingress replicas)")
        ax.set_title(f"sal ÷ pow2, {metric.replace('_', ' ')}")
    axes[0].set_ylabel("ratio (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--limit", type=int, default=6000)
    p.add_argument("--routers", default="1,2,4,8,16")
    p.add_argument("--no-ablations", action="store_true")
    args = p.parse_args(argv)
    runs = [(*r, args.limit) for r in plan([int(x) for x in args.routers.split(",")], not args.no_ablations)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, runs))  # plan order: results independent of --jobs
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routers.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "routers_table.md"), "w") as f:
        f.write(ratio_table(rows))
    plot(rows, os.path.join(args.out, "routers_ratio.png"))
    print(ratio_table(rows))
    with ProcessPoolExecutor(args.jobs) as pool:
        meters = list(pool.map(traffic, [s for s in SETUPS for _ in (8,)], [8] * len(SETUPS),
                               [args.limit] * len(SETUPS)))
    with open(os.path.join(args.out, "routers_traffic.md"), "w") as f:
        f.write(traffic_table(meters))
    print(traffic_table(meters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
