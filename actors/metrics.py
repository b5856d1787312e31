"""Braid's Prometheus metrics: names prefixed `braid_`, labels bounded (model, replica,
protocol, and small fixed sets like outcome or kind — never request ids).

Each process that records metrics serves them itself (`serve_metrics(port)`): the HTTP
ingress on the metrics base port, each replica on the first port free on its machine from
base + 1 (one machine with n replicas: base + 1 ... base + n; a Kubernetes pod with k
replicas: base + 1 ... base + k, whatever their ids). `targets_file()` writes
those addresses as a Prometheus `file_sd_configs` target list (see
`dashboards/prometheus.yml`).

Request-level metrics (latency, SLA outcome, goodput, threads, fan-out and its cap,
errors) are recorded where every request ends, at the ingress; engine-level ones (live
threads, queue, KV blocks, tokens, transfers, inter-token latency, time to first token)
at each replica.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets for token latencies (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

REQUESTS = Counter("braid_requests", "Requests answered, by outcome", ["model", "protocol", "outcome"])
ERRORS = Counter("braid_errors", "Requests refused or failed, by kind", ["model", "kind"])
LATENCY = Histogram(
    "braid_request_latency_seconds", "End-to-end request latency", ["model", "protocol"], buckets=LATENCY_BUCKETS
)
SLA = Counter(
    "braid_sla", "Requests with a latency budget, by outcome: met, late, truncated (cut short); shaped: whether "
    "the budget changed what it did (a fork refused or joined early, a child cut)", ["model", "result", "shaped"],
)  # fmt: skip
GOOD_ANSWERS = Counter(
    "braid_good_answers", "Answers that count toward goodput: ended on their own within their budget, the "
    "task's check passed", ["model", "protocol"],
)  # fmt: skip
FANOUT_CAP = Counter(
    "braid_fanout_cap", "Requests by the fan-out cap the coordinator gave them (none: their own)", ["model", "cap"]
)
THREADS = Histogram("braid_threads_per_request", "Threads per request", ["model", "protocol"], buckets=COUNT_BUCKETS)
FANOUT = Histogram("braid_fork_fanout", "Children per fork", ["model", "protocol"], buckets=COUNT_BUCKETS)
CRITICAL_PATH = Histogram(
    "braid_critical_path_tokens", "Critical-path tokens per request", ["model", "protocol"], buckets=TOKEN_BUCKETS
)
SAMPLES = Histogram(
    "braid_samples_per_request",
    "Samples of a multi-sample request (n x prompts), by sample_join",
    ["model", "policy"],
    buckets=COUNT_BUCKETS,
)
VOTE_AGREEMENT = Histogram(
    "braid_vote_agreement",
    "Share of a prompt's finished samples that reached the chosen answer (vote, first_success)",
    ["model"],
    buckets=(0.2, 0.4, 0.5, 0.6, 0.8, 1.0),
)
VERIFIER_REJECTS = Counter("braid_verifier_rejects", "Samples whose answer the verifier rejected", ["model"])
FIRST_SUCCESS = Histogram(
    "braid_time_to_first_success_seconds", "Time from arrival to the first sample the verifier accepted "
    "(first_success)", ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
SAMPLES_CANCELLED = Counter(
    "braid_samples_cancelled", "Samples cancelled: not needed once one was accepted, or out of time", ["model"]
)
TTFT = Histogram(
    "braid_time_to_first_token_seconds", "Time to a request's first token", ["model"], buckets=TTFT_BUCKETS
)
ITL = Histogram(
    "braid_inter_token_latency_seconds", "Time between a thread's tokens", ["model", "replica"], buckets=ITL_BUCKETS
)
TOKENS = Counter("braid_generated_tokens", "Tokens generated, every thread", ["model", "replica"])
LIVE_THREADS = Gauge("braid_live_threads", "Threads running or queued in the engine", ["model", "replica"])
QUEUE = Gauge("braid_queue_depth", "Threads waiting for the engine", ["model", "replica"])
IN_FLIGHT = Gauge("braid_requests_in_flight", "Requests (and children run for peers) in flight", ["model", "replica"])
KV_BLOCKS = Gauge("braid_kv_blocks", "KV cache blocks by kind", ["model", "replica", "kind"])
PREFIX_HITS = Counter("braid_prefix_hit_tokens", "Prompt tokens found in the prefix index", ["model", "replica"])
TRANSFER_BYTES = Counter("braid_kv_transfer_bytes", "Prefix KV sent to other replicas", ["model", "replica"])
TRANSFER_SECONDS = Counter("braid_kv_transfer_seconds", "Time spent sending prefix KV", ["model", "replica"])
PLACED = Counter("braid_children_placed", "Forked children by where they ran", ["model", "replica", "where"])


def sample_series(model: str, policies: tuple[str, ...]) -> None:
    """The multi-sample metrics' series, at zero from the start (dashboards show 0, not no data)."""
    for policy in policies:
        SAMPLES.labels(model, policy)
    for metric in (VOTE_AGREEMENT, VERIFIER_REJECTS, FIRST_SUCCESS, SAMPLES_CANCELLED):
        metric.labels(model)


class ClusterHealth:
    """A collector for the process that talks to the coordinator (the HTTP ingress): the
    coordinator's view of the cluster, read at each scrape (`read`: its `health()`, or None
    when it does not answer, and then nothing is reported)."""

    def __init__(self, read: Callable[[], dict | None], model: str) -> None:
        self.read = read
        self.model = model

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The families, without reading the coordinator (the registry asks at registration)."""
        return self._families(None)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        health = self.read()
        return self._families(health) if health is not None else iter(())

    def _families(self, health: dict | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        for name, kind, help_text, value in (
            ("braid_replicas_configured", GaugeMetricFamily, "Replicas the cluster was started with", "configured"),
            ("braid_replicas_live", GaugeMetricFamily, "Replicas that answered the coordinator's last load read "
             "in time (the others get no new requests)", "live"),
            ("braid_replica_failures", CounterMetricFamily, "Replica failures seen by requests", "failures"),
            ("braid_request_retries", CounterMetricFamily, "Requests run again on another replica after one "
             "failed", "retries"),
            ("braid_replica_restarts", CounterMetricFamily, "Replicas live again after they were not", "restarts"),
            ("braid_request_timeouts", CounterMetricFamily, "Requests ended at their time limit (HTTP 504)",
             "timeouts"),
            ("braid_admission_latency_correction", GaugeMetricFamily, "Admission's learned correction: measured "
             "latency over its model's prediction", "latency_correction"),
            ("braid_admission_margin", GaugeMetricFamily, "Share of a budget admission keeps free before the join "
             "time for the spread of its predictions (learned)", "admission_margin"),
        ):  # fmt: skip
            family = kind(name, help_text, labels=["model"])
            if health is not None:
                family.add_metric([self.model], health[value])
            yield family


def report_cluster_health(read: Callable[[], dict | None], model: str) -> None:
    """This process's metrics include the cluster's health, read at each scrape (`ClusterHealth`)."""
    REGISTRY.register(ClusterHealth(read, model))


def serve_metrics(port: int, tries: int = 1, host: str = "127.0.0.1") -> int:
    """Serve this process's metrics on http://host:p/metrics, p the first port from `port`
    (of `tries`) that is free; returns p. The default host is loopback: metrics name the
    model and the load, so they are open to the network only when asked (on Kubernetes,
    0.0.0.0, for Prometheus to scrape the pods)."""
    for p in range(port, port + tries):
        try:
            start_http_server(p, addr=host)
            return p
        except OSError:
            if p == port + tries - 1:
                raise
    raise ValueError(f"tries must be >= 1, got {tries}")


def targets_file(path: Path, host: str, ports: list[int], model: str) -> None:
    """A Prometheus file_sd target list for the ingress and replicas."""
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [f"{host}:{port}" for port in ports], "labels": {"job": "braid", "braid_model": model}}]
    path.write_text(json.dumps(groups, indent=2) + "\n")
