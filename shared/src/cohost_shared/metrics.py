"""One Prometheus scrape, read with prometheus-client's own parser, as samples to look up.

The worker reads the chatbot's vLLM gauges for chat-first sharing; `cohost status` reads
both engines and the worker. Lines that do not parse are skipped (one bad line must not
hide the rest of a scrape), so each line is parsed on its own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# vLLM's own gauges of how busy a server is.
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_LOAD = (VLLM_RUNNING, VLLM_WAITING)  # all that `vllm_load` reads


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_samples(text: str, names: Collection[str] | None = None) -> list[Sample]:
    """Every sample of the scrape, or only those named in `names` (the other lines are
    not parsed: a vLLM page has hundreds, and the worker reads two of them twice a second)."""
    samples: list[Sample] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if names is not None and line.split("{", 1)[0].split(None, 1)[0] not in names:
            continue
        try:
            families = list(text_string_to_metric_families(line + "\n"))
        except ValueError:
            continue
        samples.extend(
            Sample(s.name, dict(s.labels), float(s.value)) for f in families for s in f.samples
        )
    return samples


class Metrics:
    """Look-ups over one scrape."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = list(samples)

    @classmethod
    def parse(cls, text: str, names: Collection[str] | None = None) -> Metrics:
        return cls(parse_samples(text, names))

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over samples of `name` whose labels include `labels`; None if none."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sum(found) if found else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.samples:
            if s.name == name and label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
        return out

    def vllm_load(self) -> int | None:
        """Requests a vLLM server is running plus those waiting; None if it says neither."""
        running, waiting = self.value(VLLM_RUNNING), self.value(VLLM_WAITING)
        if running is None and waiting is None:
            return None
        return round((running or 0.0) + (waiting or 0.0))
