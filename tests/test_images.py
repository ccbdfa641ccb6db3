"""The images' Dockerfiles, checked statically with the real tools (tests/test_stack.py
builds and runs them).

- every Dockerfile (and the stand-ins') through hadolint; bases pinned, users not root;
- their build stages replayed: the COPY steps from a context filtered by .dockerignore,
  then their `uv sync` commands, into a scratch venv;
- the locked environments: no GPU stack for the worker or the cohost tool, and the worker
  image installing exactly what the worker imports.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deployfiles import (
    BIN,
    COMPOSE,
    DOCKERFILES,
    EMULATOR_DOCKERFILE,
    ENGINE_DOCKERFILE,
    ENGINES,
    ROOT,
    STANDIN_DOCKERFILES,
    VLLM_CPU_DOCKERFILE,
    VLLM_IMAGE,
    WORKER_DOCKERFILE,
    build_context,
    ignore_rules,
    ignored,
    load,
    parse_dockerfile,
    run_words,
)

GPU_STACK = ("torch", "vllm", "bitsandbytes", "triton", "xformers", "flashinfer", "nvidia-cu")


@pytest.mark.parametrize(
    "path",
    [*DOCKERFILES, VLLM_CPU_DOCKERFILE, *STANDIN_DOCKERFILES],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_dockerfile_lints_clean(path: Path) -> None:
    result = subprocess.run(
        [BIN / "hadolint", "--config", ROOT / ".hadolint.yaml", "--no-color", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip()


def test_images_are_pinned() -> None:
    services = load(COMPOSE)["services"]
    engine = parse_dockerfile(ENGINE_DOCKERFILE)
    assert engine.args["VLLM_IMAGE"] == VLLM_IMAGE
    final = engine.stages[-1]
    assert final.base == VLLM_IMAGE
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["/opt/cohost/bin/cohost", "launch"]
    assert {services[n]["command"][0] for n in ENGINES} == set(ENGINES.values())
    for path in (*DOCKERFILES, VLLM_CPU_DOCKERFILE):
        for stage in parse_dockerfile(path).stages:
            if stage.name is None and stage.base in {s.name for s in parse_dockerfile(path).stages}:
                continue
            assert re.search(r":[\w.-]*\d", stage.base), f"unpinned base {stage.base}"
            assert not stage.base.endswith(":latest")
    # The emulator: Google's image, pinned, with the project's fix built on it.
    emulator = parse_dockerfile(EMULATOR_DOCKERFILE)
    assert re.search(r":\d+\.\d+\.\d+-emulators$", emulator.args["EMULATOR_IMAGE"])
    built = services["pubsub-emulator"]["build"]["dockerfile"]
    assert built == EMULATOR_DOCKERFILE.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_images_run_as_a_non_root_user(path: Path) -> None:
    users = parse_dockerfile(path).stages[-1].all("USER")
    assert users, f"{path}: no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


@pytest.mark.parametrize(
    "path", [WORKER_DOCKERFILE, ENGINE_DOCKERFILE], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_builds_install_from_the_lock(path: Path) -> None:
    syncs = [
        run_words(rest)
        for rest in parse_dockerfile(path).stage("build").all("RUN")
        if "sync" in run_words(rest)
    ]
    assert syncs
    for words in syncs:
        assert {"--frozen", "--no-dev", "--package"} <= set(words), words


@pytest.mark.parametrize("package", ["feedback-worker", "cohost"])
def test_locked_python_environments_have_no_gpu_stack(package: str) -> None:
    """The worker image (feedback-worker) and the launcher's venv in the engine image
    (cohost) install exactly this export: no torch, no vLLM."""
    names = locked_names(package)
    assert "pydantic" in names
    for name in names:
        assert not name.startswith(GPU_STACK), f"{package} would install {name}"


# Workspace members and the distributions they build.
MEMBERS = {
    "shared": "cohost-shared",
    "ops": "cohost",
    "services/feedback": "feedback-worker",
    "services/chatbot": "chatbot",
}


def locked_names(package: str) -> set[str]:
    """The distributions `uv export` locks for `package`: what its image installs."""
    result = subprocess.run(
        ["uv", "export", "--frozen", "--no-dev", "--package", package, "--no-hashes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {
        canonical(re.split(r"[=<>; ]", line.strip(), maxsplit=1)[0])
        for line in result.stdout.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "-e", "."))
    }


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> set[str]:
    data = tomllib.loads(pyproject.read_text())
    return {
        canonical(re.split(r"[=<>;\[ ]", d, maxsplit=1)[0]) for d in data["project"]["dependencies"]
    }


def imported_distributions(*sources: Path) -> dict[str, set[str]]:
    """Third-party distributions whose files the modules imported in `sources` come from
    (found by where each imported module lives), with the modules that need them."""
    owner: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if file.suffix == ".py":
                owner[Path(str(dist.locate_file(file))).resolve()] = canonical(
                    dist.metadata["Name"]
                )
    modules: set[str] = set()
    for source in sources:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from google.cloud import pubsub_v1` imports a submodule of a namespace.
                    modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    found: dict[str, set[str]] = {}
    for module in sorted(modules):
        if module.split(".")[0] in sys.stdlib_module_names or module == "__future__":
            continue
        spec = None
        with contextlib.suppress(ModuleNotFoundError):
            spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:  # an attribute, not a module: its parent
            module = module.rpartition(".")[0]
            spec = importlib.util.find_spec(module)
        assert spec is not None, module
        assert spec.origin is not None, module
        origin = Path(spec.origin).resolve()
        # The workspace's own packages are installed editable: their files are ours.
        member = next((m for m in MEMBERS if origin.is_relative_to(ROOT / m / "src")), None)
        name = owner.get(origin) or (MEMBERS[member] if member else None)
        assert name is not None, f"{module} ({spec.origin}) belongs to no installed distribution"
        found.setdefault(name, set()).add(module)
    return found


def test_worker_image_installs_only_what_the_worker_imports() -> None:
    """The worker's locked set is the closure of what its code (and the shared code it
    runs) imports, each declared where it is imported: nothing pulled in by the operator
    tools (NVML, dotenv), no second HTTP client."""
    worker, shared = ROOT / "services" / "feedback", ROOT / "shared"
    imported = imported_distributions(worker / "src", shared / "src")
    ours = {"feedback-worker", "cohost-shared"}
    assert (
        set(imported) - ours
        == (declared(worker / "pyproject.toml") | declared(shared / "pyproject.toml")) - ours
    ), imported
    locked = locked_names("feedback-worker")
    assert "cohost" not in locked, "the operator tools are not the worker's"
    for name in ("nvidia-ml-py", "httpx", "python-dotenv-cli", "psutil"):
        assert name not in locked, name


# ================================================================ build context and build steps


def test_build_context_leaves_out_local_state() -> None:
    rules = ignore_rules()
    for path in (".git/HEAD", ".venv/bin/python", ".cache/x", ".gpu/x", ".whl/x.whl",
                 ".env", "bench/results/x.json", "bench/gpu/results/x.jsonl",
                 "deploy/l4.env", "tests/test_images.py",
                 "ops/src/cohost/__pycache__/cli.cpython-311.pyc",
                 "services/feedback/.venv/bin/python"):  # fmt: skip
        assert ignored(path, rules), path


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_build_context_has_what_the_dockerfile_copies(path: Path) -> None:
    rules = ignore_rules()
    for stage in parse_dockerfile(path).stages:
        for rest in stage.all("COPY"):
            if rest.startswith("--from"):
                continue
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), source
                assert not ignored(source, rules), f"{source} is in .dockerignore"


@pytest.mark.parametrize(
    ("path", "commands"),
    [
        (WORKER_DOCKERFILE, [["feedback-worker", "--help"], ["python", "-c", "import feedback"]]),
        (ENGINE_DOCKERFILE, [["cohost", "launch", "--help"], ["python", "-c", "import cohost"]]),
    ],
    ids=["worker", "engine"],
)
def test_build_stage_replayed(path: Path, commands: list[list[str]], tmp_path: Path) -> None:
    """The build stage's WORKDIR/COPY/ENV/RUN steps, replayed outside Docker: COPY from
    the filtered build context, `uv sync` as written (into a scratch venv in place of the
    image path). The result runs, and holds neither torch nor vLLM."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    context = tmp_path / "context"
    for rel in build_context():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    stage = parse_dockerfile(path).stage("build")
    image_root = tmp_path / "image"
    workdir = image_root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    venv = Path()
    for instruction, rest in stage.instructions:
        if instruction == "WORKDIR":
            workdir = image_root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                if key == "UV_PROJECT_ENVIRONMENT":
                    venv = image_root / value.lstrip("/")
                    value = str(venv)
                env[key] = value
        elif instruction == "COPY" and not rest.startswith("--from"):
            *sources, dest = shlex.split(rest)
            for source in sources:
                target = workdir / dest
                if dest.endswith("/"):
                    target = target / Path(source).name
                if (context / source).is_dir():
                    shutil.copytree(context / source, target, dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / source, target)
        elif instruction == "RUN":
            words = run_words(rest)
            assert Path(words[0]).name == "uv", f"unexpected build step {words}"
            if "--python" not in words:
                words += ["--python", sys.executable]
            result = subprocess.run(
                [uv, *words[1:]], cwd=workdir, env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, result.stderr
    assert (venv / "bin").is_dir()
    for command in commands:
        result = subprocess.run(
            [str(venv / "bin" / command[0]), *command[1:]],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    site = next(venv.glob("lib/python3*/site-packages"))
    installed = {p.name.lower() for p in site.iterdir()}
    assert not [n for n in installed if n.startswith(GPU_STACK)]
    # Installed as wheels, not as links back into the source tree.
    assert not list(site.glob("*.pth")) or all(
        str(workdir) not in p.read_text() for p in site.glob("*.pth")
    )
