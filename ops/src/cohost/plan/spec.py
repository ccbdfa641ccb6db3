"""What the operator asks for, per service: `--service NAME=MODEL[,key=value...]`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_BATCHED_TOKENS = 2048
# Tokens per streamed chunk (vLLM's --stream-interval). The first service is interactive:
# its users see every token as it comes. The others are read by a program that pays per
# chunk: at one token a chunk the worker's loop read at most about 3,000 tok/s on a core
# of the 2-core test machine, at 8 about 18,000 (bench/stream_cost.py).
INTERACTIVE_STREAM_INTERVAL = 1
BATCH_STREAM_INTERVAL = 8


class PlanError(ValueError):
    """Input the planner cannot work with (the message says what to change)."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    model: str
    max_model_len: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS
    util: float | None = None
    weights: str | None = None
    kv_cache_dtype: str = "auto"
    serve: str | None = None  # what vLLM loads (HF id or path); default: model
    # Under MPS sharing: the share of the GPU's SMs and the client priority; None leaves
    # the choice to the plan (cohost.plan.sharing).
    sm_percent: int | None = None
    priority: str | None = None
    stream_interval: int | None = None  # None: by its place in the order (above)

    def stream_interval_at(self, index: int) -> int:
        if self.stream_interval is not None:
            return self.stream_interval
        return INTERACTIVE_STREAM_INTERVAL if index == 0 else BATCH_STREAM_INTERVAL

    @classmethod
    def parse(cls, text: str) -> ServiceSpec:
        """NAME=MODEL[,max_model_len=N][,max_num_seqs=N][,util=F][,weights=W][,kv=fp8]
        [,sm=PERCENT][,priority=normal|low][,stream=TOKENS]..."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise PlanError(f"--service {text!r}: expected NAME=MODEL[,key=value...]")
        model, *options = rest.split(",")
        values: dict[str, str] = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or not value:
                raise PlanError(f"--service {name}: {option!r} is not key=value")
            values[key.strip()] = value.strip()
        fields: dict[str, object] = {"name": name.strip(), "model": model.strip()}
        ints = {
            "max_model_len": "max_model_len",
            "max_num_seqs": "max_num_seqs",
            "max_num_batched_tokens": "max_num_batched_tokens",
            "batched_tokens": "max_num_batched_tokens",
            "stream": "stream_interval",
        }
        for key, value in values.items():
            try:
                if key in ints:
                    fields[ints[key]] = int(value)
                elif key == "util":
                    fields["util"] = float(value)
                elif key == "weights":
                    fields["weights"] = value
                elif key in ("kv", "kv_cache_dtype"):
                    fields["kv_cache_dtype"] = value
                elif key == "serve":
                    fields["serve"] = value
                elif key == "sm":
                    fields["sm_percent"] = int(value)
                elif key == "priority":
                    fields["priority"] = value
                else:
                    raise PlanError(
                        f"--service {name}: unknown key {key!r} (max_model_len, max_num_seqs, "
                        "util, weights, kv, batched_tokens, serve, sm, priority, stream)"
                    )
            except ValueError as exc:
                if isinstance(exc, PlanError):
                    raise
                raise PlanError(f"--service {name}: {key}={value!r} is not a number") from None
        spec = cls(**fields)  # type: ignore[arg-type]
        if spec.stream_interval is not None and spec.stream_interval < 1:
            raise PlanError(f"--service {name}: stream must be at least 1 token a chunk")
        return spec

    def describe(self) -> str:
        parts = [f"{self.name}={self.model}"]
        if self.max_model_len:
            parts.append(f"max_model_len={self.max_model_len}")
        parts.append(f"max_num_seqs={self.max_num_seqs}")
        if self.max_num_batched_tokens != DEFAULT_BATCHED_TOKENS:
            parts.append(f"batched_tokens={self.max_num_batched_tokens}")
        if self.util is not None:
            parts.append(f"util={self.util}")
        if self.weights:
            parts.append(f"weights={self.weights}")
        if self.kv_cache_dtype != "auto":
            parts.append(f"kv={self.kv_cache_dtype}")
        if self.serve:
            parts.append(f"serve={self.serve}")
        if self.sm_percent is not None:
            parts.append(f"sm={self.sm_percent}")
        if self.priority is not None:
            parts.append(f"priority={self.priority}")
        if self.stream_interval is not None:
            parts.append(f"stream={self.stream_interval}")
        return ",".join(parts)
