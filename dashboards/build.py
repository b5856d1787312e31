"""Writes Braid's Grafana dashboards (JSON) from the panel lists below.

    python -m dashboards.build      # rewrites dashboards/*.json and the Helm chart's copies

Each dashboard uses a `datasource` variable (any Prometheus), and every panel's query
uses only `braid_*` metrics and `up`. tests/test_metrics.py evaluates every query against
a real Prometheus scraping a running Braid, and checks these files match this script.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
RATE = "[2m]"

DASHBOARDS: dict[str, list[tuple[str, str, list[str]]]] = {
    # title -> [(panel title, unit, [queries])]
    "Braid overview": [
        ("Requests per second by outcome", "reqps",
         [f"sum by (outcome) (rate(braid_requests_total{RATE}))"]),
        ("Request latency p50 / p99", "s",
         [f"histogram_quantile(0.5, sum by (le) (rate(braid_request_latency_seconds_bucket{RATE})))",
          f"histogram_quantile(0.99, sum by (le) (rate(braid_request_latency_seconds_bucket{RATE})))"]),
        ("SLA attainment (budgeted requests answered within their budget; cut ones are misses)", "percentunit",
         [f'sum(rate(braid_sla_total{{result="met"}}{RATE})) / sum(rate(braid_sla_total{RATE}))']),
        ("Goodput: answers within their budget per second (the task's check passed)", "reqps",
         [f"sum(rate(braid_good_answers_total{RATE}))"]),
        ("Budgeted requests per second by SLA outcome (met, late, truncated)", "reqps",
         [f"sum by (result) (rate(braid_sla_total{RATE}))"]),
        ("Budgeted answers shaped by their deadline (a fork refused or joined early, a child cut)", "percentunit",
         [f'(sum(rate(braid_sla_total{{shaped="true"}}{RATE})) or vector(0)) / sum(rate(braid_sla_total{RATE}))']),
        ("Errors per second by kind", "reqps", [f"sum by (kind) (rate(braid_errors_total{RATE}))"]),
        ("Admission: correction of its predicted latency, and margin kept for their spread (share of the budget)",
         "short", ["max(braid_admission_latency_correction)", "max(braid_admission_margin)"]),
        ("Time to first token p50 / p99", "s",
         [f"histogram_quantile(0.5, sum by (le) (rate(braid_time_to_first_token_seconds_bucket{RATE})))",
          f"histogram_quantile(0.99, sum by (le) (rate(braid_time_to_first_token_seconds_bucket{RATE})))"]),
        ("Generated tokens per second", "short", [f"sum(rate(braid_generated_tokens_total{RATE}))"]),
    ],
    "Braid parallelism": [
        ("Threads per request (mean)", "short",
         [f"sum(rate(braid_threads_per_request_sum{RATE})) / sum(rate(braid_threads_per_request_count{RATE}))"]),
        ("Fan-out per fork (mean)", "short",
         [f"sum(rate(braid_fork_fanout_sum{RATE})) / sum(rate(braid_fork_fanout_count{RATE}))"]),
        ("Requests per second by the fan-out cap given (narrower under load)", "reqps",
         [f"sum by (cap) (rate(braid_fanout_cap_total{RATE}))"]),
        ("Critical-path tokens p50", "short",
         [f"histogram_quantile(0.5, sum by (le) (rate(braid_critical_path_tokens_bucket{RATE})))"]),
        ("Live threads by replica", "short", ["sum by (replica) (braid_live_threads)"]),
        ("Forked children by placement", "short", [f"sum by (where) (rate(braid_children_placed_total{RATE}))"]),
        ("Samples per multi-sample request (mean; n x prompts, joined across replicas)", "short",
         [f"sum(rate(braid_samples_per_request_sum{RATE})) / sum(rate(braid_samples_per_request_count{RATE}))"]),
        ("Vote agreement (mean share of samples reaching the chosen answer)", "percentunit",
         [f"sum(rate(braid_vote_agreement_sum{RATE})) / sum(rate(braid_vote_agreement_count{RATE}))"]),
        ("Verifier rejects and samples cancelled per second", "short",
         [f"sum(rate(braid_verifier_rejects_total{RATE}))", f"sum(rate(braid_samples_cancelled_total{RATE}))"]),
        ("Time to first success p50 (first_success)", "s",
         [f"histogram_quantile(0.5, sum by (le) (rate(braid_time_to_first_success_seconds_bucket{RATE})))"]),
    ],
    "Braid KV cache": [
        ("KV blocks by kind", "short", ["sum by (kind) (braid_kv_blocks)"]),
        ("Shared fraction of used blocks", "percentunit",
         ['sum(braid_kv_blocks{kind="shared"}) / clamp_min(sum(braid_kv_blocks{kind="used"}), 1)']),
        ("Prefix hit tokens per second", "short", [f"sum(rate(braid_prefix_hit_tokens_total{RATE}))"]),
        ("Prefix KV transferred (bytes/s)", "Bps", [f"sum(rate(braid_kv_transfer_bytes_total{RATE}))"]),
        ("Transfer time per second spent", "s", [f"sum(rate(braid_kv_transfer_seconds_total{RATE}))"]),
    ],
    "Braid replicas": [
        ("Replica up", "short", ['up{job="braid"}']),
        ("Replicas live / configured (the coordinator's view)", "short",
         ["sum(braid_replicas_live)", "sum(braid_replicas_configured)"]),
        ("Replica failures, request retries, replica restarts and request timeouts per second", "short",
         [f"sum(rate(braid_replica_failures_total{RATE}))", f"sum(rate(braid_request_retries_total{RATE}))",
          f"sum(rate(braid_replica_restarts_total{RATE}))", f"sum(rate(braid_request_timeouts_total{RATE}))"]),
        ("Requests in flight by replica", "short", ["sum by (replica) (braid_requests_in_flight)"]),
        ("Queue depth by replica", "short", ["sum by (replica) (braid_queue_depth)"]),
        ("Inter-token latency p50 by replica", "s",
         [f"histogram_quantile(0.5, sum by (le, replica) (rate(braid_inter_token_latency_seconds_bucket{RATE})))"]),
        ("Tokens per second by replica", "short", [f"sum by (replica) (rate(braid_generated_tokens_total{RATE}))"]),
    ],
}  # fmt: skip


def dashboard(title: str, panels: list[tuple[str, str, list[str]]]) -> dict:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "title": title,
        "uid": title.lower().replace(" ", "-"),
        "schemaVersion": 39,
        "tags": ["braid"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": name,
                "datasource": datasource,
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
                "targets": [{"refId": "ABCD"[j], "expr": q, "datasource": datasource} for j, q in enumerate(queries)],
            }
            for i, (name, unit, queries) in enumerate(panels)
        ],
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{title.lower().replace(' ', '-')}.json": json.dumps(dashboard(title, panels), indent=2) + "\n"
        for title, panels in DASHBOARDS.items()
    }


CHART_FILES = HERE.parent / "helm" / "braid" / "files"  # the Helm chart's copies (a chart reads only its own folder)


def write() -> None:
    """The dashboards here and in the chart; the alert rules copied into the chart."""
    for name, text in render().items():
        for folder in (HERE, CHART_FILES / "dashboards"):
            (folder / name).write_text(text)
    (CHART_FILES / "alerts.yml").write_text((HERE / "alerts.yml").read_text())
    print(f"wrote dashboards/*.json and their copies under {CHART_FILES.relative_to(HERE.parent)}")


if __name__ == "__main__":
    write()
