"""What the broker exports to Prometheus, as ``skyhop_broker_<name>``.

The per-node gauges make one scrape of the broker see every node of the fleet, edges
behind NAT included: they are read from the broker's fleet view (the nodes' own load
reports), not from the nodes. They are labelled by ``node`` and ``role``;
``node_info`` carries the slower-moving labels (device class, telemetry probe), to be
joined on ``node`` as Prometheus's ``*_info`` convention has it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from skyhop.metrics import GaugeReading, Metrics, Spec, counter, gauge, histogram

NAMESPACE = "skyhop_broker"
MIB = 1024 * 1024

CATALOG: dict[str, Spec] = {
    # requests
    "requests_received_total": counter("Request messages read from the request topics."),
    "requests_accepted_total": counter("Requests accepted (to be answered exactly once), "
                                       "by model.", "model"),
    "duplicates_total": counter("Copies of requests already held or answered here "
                                "(a redelivery, or a client sending again)."),
    "replies_resent_total": counter("Replies sent again to a client that asked again for a "
                                    "request answered here (ADR 0010)."),
    "replies_total": counter("Terminal replies to accepted requests, by code and by where "
                             "they ran (edge, cloud, or none for the broker's own errors).",
                             "code", "where"),
    "refused_total": counter("Requests refused before they were accepted (bad input, "
                             "rate, replay, stopping), by code.", "code"),
    "slo_met_total": counter("Accepted requests answered OK within their budget, by model.",
                             "model"),
    "slo_missed_total": counter("Accepted requests answered late or with an error, by model.",
                                "model"),
    "redispatched_total": counter("Requests placed again, by why (the holder's refusal, "
                                  "node_lost, undelivered).", "reason"),
    "work_undelivered_total": counter("Work the MQTT server had nobody to give to (its "
                                      "node not connected): placed again at once."),
    "late_replies_total": counter("Node replies that came after the request was answered."),
    "stale_total": counter("Requests that waited past their budget before reaching this "
                           "broker (a client's or the MQTT server's queue): answered "
                           "DEADLINE_EXCEEDED, never run.", "stage"),
    "drain_unanswered_total": counter("Requests answered UNAVAILABLE because the broker "
                                      "stopped before their reply."),
    "request_latency_seconds": histogram(
        "Time from a request's acceptance at the broker to its terminal reply, by model "
        "and placement (edge, cloud, or none).", "model", "where"),
    "queue_wait_seconds": histogram("Time an answered request waited in its node's queue, "
                                    "as the node reported it.", "model", "where"),
    "service_seconds": histogram("Time the model ran for an answered request, as the node "
                                 "reported it.", "model", "where"),
    "pending_requests": gauge("Requests accepted and not yet answered."),
    # bad input and the broker's own health
    "bad_messages_total": counter("Messages dropped for breaking the protocol, by kind.",
                                  "kind"),
    "handler_errors_total": counter("Bugs: a handler raised (one message lost, never the "
                                    "thread). Should stay 0."),
    "node_messages_limited_total": counter("Node status and load messages dropped beyond "
                                           "[broker] node_rate."),
    "births_asked_total": counter("Nodes that sent load with no status this broker could "
                                  "read, asked to announce themselves again."),
    "spoofed_node_messages_total": counter("Node messages whose payload names another node "
                                           "than their topic."),
    "sla_rejected_total": counter("SLA messages ignored: unsigned, forged, not-operator, "
                                  "expired, revoked, stale or topic (docs/security.md).",
                                  "reason"),
    "budget_capped_total": counter("Requests whose own budget exceeded their model's SLA: "
                                   "placed and judged by the SLA's.", "model"),
    "audit_errors_total": counter("Audit entries that could not be written to "
                                  "HOME/audit.jsonl."),
    # the fleet, as this broker sees it
    "live_nodes": gauge("Nodes online and heard from within node_timeout_s."),
    "node_info": gauge("1 per known node, with its device class and telemetry probe.",
                       "node", "role", "device", "probe"),
    "node_up": gauge("1 while the node is live, 0 once offline.", "node", "role"),
    "node_draining": gauge("1 while the node finishes its work before leaving.",
                           "node", "role"),
    "node_queue_depth": gauge("Requests waiting at the node (its last load report).",
                              "node", "role"),
    "node_in_flight": gauge("Requests running at the node (its last load report).",
                            "node", "role"),
    "node_outstanding": gauge("Requests this broker placed on the node and holds.",
                              "node", "role"),
    "node_device_utilization_ratio": gauge("The node's accelerator utilisation, 0 to 1.",
                                           "node", "role"),
    "node_device_memory_used_bytes": gauge("The node's accelerator memory in use.",
                                           "node", "role"),
    "node_device_memory_total_bytes": gauge("The node's accelerator memory in all.",
                                            "node", "role"),
    "node_link_rtt_seconds": gauge("Round trip between this broker and the node, as "
                                   "learned from its replies.", "node", "role"),
    "node_last_seen_seconds": gauge("Seconds since the node was last heard from.",
                                    "node", "role"),
    # the cloud pool
    "pool_target": gauge("Workers the autoscaler wants."),
    "pool_ready": gauge("Pool workers online and taking work."),
    "pool_starting": gauge("Pool workers asked for and not yet online."),
    "pool_stopping": gauge("Pool workers told to stop and not yet gone."),
    "pool_last_cold_start_seconds": gauge("The last worker's time from asked to online."),
    "pool_worker_crashes_total": counter("Pool workers that died without being stopped."),
    "pool_workers_started_total": counter("Pool workers asked for."),
    "pool_workers_stopped_total": counter("Pool workers told to stop."),
    "pool_scale_events_total": counter("Changes of the pool's target, by direction.",
                                       "direction"),
}

POOL_GAUGES = ("target", "ready", "starting", "stopping", "last_cold_start_seconds")

# node gauge -> how to read it from a row of the status document's "nodes"
Row = Mapping[str, Any]
_NODE_FIELDS: dict[str, Callable[[Row], float]] = {
    "node_up": lambda n: n["state"] != "offline",
    "node_draining": lambda n: n["state"] == "draining",
    "node_queue_depth": lambda n: n["queue"],
    "node_in_flight": lambda n: n["in_flight"],
    "node_outstanding": lambda n: n["outstanding"],
    "node_device_utilization_ratio": lambda n: n["gpu_util"],
    "node_device_memory_used_bytes": lambda n: n["mem_mb"][0] * MIB,
    "node_device_memory_total_bytes": lambda n: n["mem_mb"][1] * MIB,
    "node_link_rtt_seconds": lambda n: n["rtt_ms"] / 1000,
    "node_last_seen_seconds": lambda n: n["last_seen_s"],
}


def bind_nodes(metrics: Metrics, nodes: Callable[[], Sequence[Row]]) -> None:
    """Bind the per-node gauges to ``nodes()``: the status document's node rows, read
    once per gauge family at scrape time."""
    def reader(name: str) -> Callable[[], GaugeReading]:
        field = _NODE_FIELDS[name]

        def read() -> GaugeReading:
            return {(n["node"], n["role"]): float(field(n)) for n in nodes()}

        return read

    for name in _NODE_FIELDS:
        metrics.read(name, reader(name))
    metrics.read("node_info", lambda: _info(nodes()))


def _info(rows: Sequence[Row]) -> GaugeReading:
    return {(n["node"], n["role"], n["gpu"], n["probe"]): 1.0 for n in rows}
