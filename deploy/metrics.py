"""The ingress's metrics (``ray.serve.metrics``: every process reports to its node's Ray metrics agent, so the
series from all ingress replicas aggregate in Prometheus).

Scrape each Ray node's metrics agent, ``http://127.0.0.1:<metrics export port>/metrics`` (fix the port with
``ray start --metrics-export-port``; Ray's Prometheus service discovery file lists all nodes), or read
``GET /metrics`` on the ingress, which returns this node's ``halffull_*`` series (``node_metrics_text``).
Names (Ray prefixes them with ``ray_``):
  halffull_requests_total{endpoint, status}                 requests by HTTP status
  halffull_routed_requests_total{llm_replica, policy}       which replica served each request (the routing
                                                            decision that stuck, after any rejection)
  halffull_ttft_seconds, halffull_tpot_seconds, halffull_e2e_seconds   histograms (DESIGN.md §7 definitions,
                                                            measured at the ingress)
  halffull_prompt_tokens_total, halffull_output_tokens_total, halffull_cached_prompt_tokens_total
  halffull_preemptions_total                                preemptions suffered by finished requests
  halffull_stream_errors_total{endpoint, code}              started streams that ended with an error event
  halffull_retries_total{reason}                            re-sends after a replica failure
  halffull_rejected_requests_total{reason}                  429s: ingress | queue | engine
  halffull_ingress_active_requests                          generation requests in this ingress replica now
"""

from ray.serve import metrics

_TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0]
_E2E_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class IngressMetrics:
    def __init__(self, policy: str):
        self.policy = policy
        self.requests = metrics.Counter("halffull_requests", "Requests by endpoint and HTTP status.",
                                        tag_keys=("endpoint", "status"))
        self.routed = metrics.Counter("halffull_routed_requests", "Requests served, by LLM replica.",
                                      tag_keys=("llm_replica", "policy"))
        self.ttft = metrics.Histogram("halffull_ttft_seconds", "Time to first token.", boundaries=_TTFT_BUCKETS)
        self.tpot = metrics.Histogram("halffull_tpot_seconds", "Time per output token after the first.",
                                      boundaries=_TPOT_BUCKETS)
        self.e2e = metrics.Histogram("halffull_e2e_seconds", "Request latency, arrival to last token.",
                                     boundaries=_E2E_BUCKETS)
        self.prompt_tokens = metrics.Counter("halffull_prompt_tokens", "Prompt tokens of finished requests.")
        self.cached_tokens = metrics.Counter("halffull_cached_prompt_tokens", "Prompt tokens served from cache.")
        self.output_tokens = metrics.Counter("halffull_output_tokens", "Output tokens generated.")
        self.preemptions = metrics.Counter("halffull_preemptions", "Preemptions of finished requests.")
        self.stream_errors = metrics.Counter("halffull_stream_errors",
                                             "Started streams that ended with an error event.",
                                             tag_keys=("endpoint", "code"))
        self.retries = metrics.Counter("halffull_retries", "Re-sends after a replica failure.", tag_keys=("reason",))
        self.rejected = metrics.Counter("halffull_rejected_requests", "Requests refused with 429, by the limit hit.",
                                        tag_keys=("reason",))
        self.active = metrics.Gauge("halffull_ingress_active_requests",
                                    "Generation requests in this ingress replica now.")

    def status(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def finished(self, run: "Run") -> None:
        end = run.end or {}
        self.routed.inc(tags={"llm_replica": run.replica or "unknown", "policy": self.policy})
        if run.first_token_time is not None:
            ttft = run.first_token_time - run.arrival
            self.ttft.observe(ttft)
            e2e = run.last_token_time - run.arrival
            self.e2e.observe(e2e)
            if run.num_tokens > 1:
                self.tpot.observe((e2e - ttft) / (run.num_tokens - 1))
        self.prompt_tokens.inc(end.get("num_prompt_tokens", 0) or 0)
        if end.get("num_cached_tokens"):
            self.cached_tokens.inc(end["num_cached_tokens"])
        if run.num_tokens:
            self.output_tokens.inc(run.num_tokens)
        if end.get("num_preemptions"):
            self.preemptions.inc(end["num_preemptions"])




def node_metrics_text() -> str:
    """This node's halffull_* series from the Ray metrics agent (blocking; run in a thread)."""
    import urllib.request

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or not node.get("MetricsExportPort"):
        return "# no metrics agent found on this node\n"
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return "".join(line + "\n" for line in text.splitlines() if "halffull_" in line)

