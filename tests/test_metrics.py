"""Reading Prometheus scrapes (cohost_shared.metrics): what the worker and `cohost status` see."""

from __future__ import annotations

from cohost_shared.metrics import VLLM_LOAD, Metrics


def test_parse_metrics_reads_labels_escapes_and_special_values() -> None:
    text = "\n".join(
        [
            "# HELP feedback_dead_lettered_total Requests sent to the dead-letter topic",
            "# TYPE feedback_dead_lettered_total counter",
            'feedback_dead_lettered_total{reason="invalid_json"} 3.0',
            'feedback_dead_lettered_total{reason="too_large"} 2.0',
            'vllm:num_requests_running{engine="0",model_name="feedback"} 4.0',
            'weird{path="a\\"b\\\\c",le="+Inf"} +Inf 1712345678000',
            "vllm:kv_cache_usage_perc NaN",
            "garbage line without a value",
        ]
    )
    m = Metrics.parse(text)
    assert m.value("feedback_dead_lettered_total") == 5.0
    assert m.by_label("feedback_dead_lettered_total", "reason") == {
        "invalid_json": 3.0,
        "too_large": 2.0,
    }
    assert m.value("vllm:num_requests_running", model_name="feedback") == 4.0
    weird = next(s for s in m.samples if s.name == "weird")
    assert weird.labels == {"path": 'a"b\\c', "le": "+Inf"}
    assert weird.value == float("inf")
    assert m.value("missing") is None


def test_vllm_load_is_running_plus_waiting_or_none() -> None:
    text = (
        'vllm:num_requests_running{model_name="chatbot"} 2.0\n'
        'vllm:num_requests_waiting{model_name="chatbot"} 3.0\n'
    )
    assert Metrics.parse(text).vllm_load() == 5
    assert Metrics.parse('vllm:num_requests_waiting{model_name="x"} 1.0\n').vllm_load() == 1
    assert Metrics.parse("other_metric 4.0\n").vllm_load() is None


def test_parse_can_keep_only_named_samples() -> None:
    """The worker reads two gauges twice a second: only their lines are parsed."""
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="chatbot"} 2.0\n'
        "vllm:num_requests_waiting 3.0\n"
        'vllm:num_requests_running_total{model_name="chatbot"} 9.0\n'
        'vllm:e2e_request_latency_seconds_bucket{le="0.3"} 7.0\n'
    )
    kept = Metrics.parse(text, VLLM_LOAD)
    assert sorted(s.name for s in kept.samples) == sorted(VLLM_LOAD)
    assert kept.vllm_load() == Metrics.parse(text).vllm_load() == 5
