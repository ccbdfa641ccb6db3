"""A model's shape, read from its config.json: what the memory model needs.

MODEL is a folder holding config.json, or a Hugging Face id already in the local
cache (`$HF_HOME/hub`); nothing is fetched from the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """The model cannot be found or its config cannot be used."""


WEIGHT_FORMATS = ("bf16", "fp16", "awq", "gptq", "fp8")


@dataclass(frozen=True)
class ModelShape:
    source: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool
    # Per layer: the sliding window in tokens, or None for full attention.
    layer_windows: tuple[int | None, ...]
    weights: str  # one of WEIGHT_FORMATS, from the checkpoint's dtype / quantization_config


def hf_cache_dirs() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots.append(hf_home / "hub")
    return roots


def find_config(model: str) -> Path:
    """config.json of a folder, or of a cached Hugging Face id's newest snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{path} has no config.json")
        return config
    if path.suffix == ".json" and path.is_file():
        return path
    if "/" in model and not model.startswith((".", "/", "~")):
        folder = "models--" + model.replace("/", "--")
        for root in hf_cache_dirs():
            snapshots = sorted(
                (root / folder / "snapshots").glob("*/config.json"),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
            if snapshots:
                return snapshots[0]
        raise ModelError(
            f"{model!r} is not a folder, and not in the local Hugging Face cache "
            f"({', '.join(str(r) for r in hf_cache_dirs())}); download it first "
            "(`hf download MODEL config.json`) or pass a folder with its config.json"
        )
    raise ModelError(f"model folder {model!r} does not exist")


def _int(cfg: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is not None:
        return default
    raise ModelError(f"config.json lacks {' / '.join(keys)}")


def _weights(cfg: dict[str, Any]) -> str:
    quant = cfg.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method in ("awq", "gptq", "fp8"):
        if method in ("awq", "gptq") and quant.get("bits", 4) != 4:
            raise ModelError(f"{method} with {quant.get('bits')} bits is not supported (4 only)")
        return method
    if method:
        raise ModelError(f"quantization {method!r} is not supported (awq, gptq, fp8)")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return "fp16" if dtype in ("float16", "half") else "bf16"


def _windows(cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return (None,) * layers
    if cfg.get("use_sliding_window") is False:
        return (None,) * layers
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:
        # Gemma 3: every `pattern`-th layer is global.
        return tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
    if cfg.get("model_type") == "gemma2":
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    return (window,) * layers


def load(model: str) -> ModelShape:
    config_path = find_config(model)
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_path}: {exc}") from exc
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
    if any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ModelError(f"{model}: mixture-of-experts models are not supported by the planner yet")
    archs = cfg.get("architectures") or ["unknown"]
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, "num_attention_heads", "n_head")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    return ModelShape(
        source=str(config_path.parent),
        architecture=str(archs[0]),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", "n_inner", default=4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", default=hidden // heads),
        vocab_size=_int(cfg, "vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=_int(
            cfg, "max_position_embeddings", "n_positions", "max_seq_len", default=2048
        ),
        qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        layer_windows=_windows(cfg, layers),
        weights=_weights(cfg),
    )


def longest_token_chars(folder: Path) -> int | None:
    """The longest entry of tokenizer.json's vocabulary and added tokens, in characters,
    or None without a readable one. An upper bound on the text one token covers: a
    byte-level entry has one character per byte and a `<0x41>` byte-fallback entry stands
    for one byte; this is how vLLM bounds it too (max_chars_per_token)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        # BPE and WordPiece: {token: id}; Unigram: [[token, score], ...].
        tokens = list(vocab) if isinstance(vocab, dict) else [entry[0] for entry in vocab]
        tokens += [t["content"] for t in data.get("added_tokens") or []]
        return max(len(t) for t in tokens if isinstance(t, str))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
