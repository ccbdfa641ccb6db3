"""Prometheus metrics of the worker, served on FEEDBACK_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECEIVED = Counter("feedback_received_total", "Messages received from the request source")
SUCCEEDED = Counter("feedback_succeeded_total", "Requests answered and acked")
RETRIED = Counter("feedback_retried_total", "Engine calls retried after a transient failure")
NACKED = Counter("feedback_nacked_total", "Messages nacked for redelivery", ["cause"])
DEAD_LETTERED = Counter(
    "feedback_dead_lettered_total", "Requests sent to the dead-letter topic", ["reason"]
)
ENGINE_ERRORS = Counter("feedback_engine_errors_total", "Failed engine calls", ["kind"])
COPIES = Counter(
    "feedback_copies_total",
    "Copies of a message this worker was answering or had answered (not answered again)",
    ["original"],
)
IN_FLIGHT = Gauge("feedback_in_flight", "Requests being processed now")
CONCURRENCY_LIMIT = Gauge(
    "feedback_concurrency_limit", "Engine calls allowed at once now (chat-first sharing)"
)
PREEMPTIONS = Counter(
    "feedback_preemptions_total", "Engine calls stopped mid-answer because chat was busy"
)
RESUMES = Counter("feedback_resumes_total", "Preempted answers continued from their tokens")
PREEMPT_DROPPED_TOKENS = Counter(
    "feedback_preempt_dropped_tokens_total",
    "Tokens dropped at a preemption because they ended inside a character",
)
PAUSED = Gauge("feedback_paused", "Preempted answers waiting for chat to go idle")
ENGINE_PAUSES = Counter(
    "feedback_engine_pauses_total", "Times the feedback engine was paused for chat (pause mode)"
)
ENGINE_PAUSED = Gauge("feedback_engine_paused", "1 while the feedback engine is paused for chat")
ENGINE_PAUSED_SECONDS = Counter(
    "feedback_engine_paused_seconds_total",
    "Seconds the feedback engine was held paused for chat (counted at each resume)",
)
CHAT_BUSY = Gauge("feedback_chat_busy", "1 while the chatbot counts as busy (preemption)")
LATENCY = Histogram(
    "feedback_latency_seconds",
    "Receipt to ack of answered requests",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
COMPLETION_TOKENS = Counter("feedback_completion_tokens_total", "Tokens generated")


def serve(host: str, port: int) -> None:
    if port:
        start_http_server(port, addr=host)
