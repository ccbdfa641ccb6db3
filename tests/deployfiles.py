"""What the Docker deployment's tests read (tests/test_compose*.py, tests/test_images.py):
the compose files as compose interpolates them, the Dockerfiles' stages, and the build
context that .dockerignore lets through. Helpers only; no tests here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from cohost.plan import envfile

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
LOCAL = ROOT / "compose.local.yml"
CPU = ROOT / "compose.cpu.yml"
MPS = ROOT / "compose.mps.yml"
WORKER_DOCKERFILE = ROOT / "services" / "feedback" / "Dockerfile"
ENGINE_DOCKERFILE = ROOT / "services" / "chatbot" / "Dockerfile"
EMULATOR_DOCKERFILE = ROOT / "services" / "pubsub-emulator" / "Dockerfile"
VLLM_CPU_DOCKERFILE = ROOT / "services" / "vllm-cpu" / "Dockerfile"
# The images built from the repository root (services/vllm-cpu has its own staged context).
DOCKERFILES = [WORKER_DOCKERFILE, ENGINE_DOCKERFILE, EMULATOR_DOCKERFILE]
STANDIN_DOCKERFILES = sorted((ROOT / "docker" / "standins").glob("*.Dockerfile"))
# The CPU plan (cohost plan --cpu, for compose.cpu.yml); every other env file is a GPU's.
CPU_ENV = ROOT / "deploy" / "cpu.env"
ENV_FILES = sorted(p for p in (ROOT / "deploy").glob("*.env") if p != CPU_ENV)
PROFILES = [path.stem for path in ENV_FILES]

VLLM_IMAGE = "vllm/vllm-openai:v0.26.0"
# compose service -> the `cohost launch` service it runs
ENGINES = {"chatbot": "chatbot", "feedback-engine": "feedback"}
WORKER = "feedback-worker"
ENGINE_PORT = 8000
# Values tests give the variables compose requires.
TEST_KEY = "test-key-not-a-secret"


def replan(plan: Path, mode: str, out: Path) -> Path:
    """`plan` planned again with `--sharing mode` by the `cohost` command, its env file at
    `out`."""
    result = subprocess.run(
        [BIN / "cohost", *envfile.replan_command(plan, out, sharing_mode=mode)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert envfile.sharing_of(envfile.read(out)) == mode
    return out


def mps_plan(profile: str, out: Path) -> Path:
    """The shipped plan (time-slicing) made for MPS: what compose.mps.yml is for."""
    return replan(ROOT / "deploy" / f"{profile}.env", "mps", out)


# ---------------------------------------------------------------- helpers: compose


class MissingVariable(LookupError):
    pass


INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op is None:
            return value or ""
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if value is None or (op == ":?" and not value):
            raise MissingVariable(f"{name}: {arg}")
        return value

    return INTERPOLATION.sub(one, text)


@dataclass(frozen=True)
class Tagged:
    """Compose's `!reset` and `!override` in an override file, kept as written."""

    tag: str
    value: Any


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.SequenceNode):
        value: Any = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def load(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader
    assert isinstance(data, dict)
    return data


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, Tagged):
        yield from strings(node.value)


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so keys can be checked"
    return env


def env_files(service: dict[str, Any], shell: Mapping[str, str]) -> list[Path]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str) else entries
    return [ROOT / interpolate(e if isinstance(e, str) else e["path"], shell) for e in entries]


def container_env(service: dict[str, Any], shell: Mapping[str, str]) -> dict[str, str]:
    """What a container of this service starts with: env files, then `environment`
    (a variable without a value is passed through from the shell, or left out)."""
    env: dict[str, str] = {}
    for path in env_files(service, shell):
        env.update(envfile.read(path))
    for key, value in environment(service).items():
        if value is None:
            if key in shell:
                env[key] = shell[key]
            else:
                env.pop(key, None)
        else:
            env[key] = interpolate(str(value), shell)
    return env


def shell_for(profile: str) -> dict[str, str]:
    return {"COHOST_PROFILE": profile, "CHATBOT_API_KEY": TEST_KEY}


def duration_s(text: str | int | float) -> float:
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on in the long form, with a condition each"
    return deps


# ---------------------------------------------------------------- helpers: Dockerfiles


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(interpolate(words[0], args), name))
        elif not stages:
            assert instruction == "ARG", f"{path}: {instruction} before the first FROM"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((instruction, rest))
    return Dockerfile(args, stages)


def run_words(rest: str) -> list[str]:
    """A RUN's command, without its --mount/--network flags."""
    words = shlex.split(rest)
    while words and words[0].startswith("--"):
        words.pop(0)
    return words


# ---------------------------------------------------------------- helpers: .dockerignore


def ignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex = regex[:-2] + "(?:.*/)?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex + r"\Z"), pattern))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, regex, _ in rules:
        if any(regex.match(p) for p in prefixes):
            verdict = not negated
    return verdict


def could_reinclude(directory: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    parts = directory.split("/")
    for negated, _, pattern in rules:
        if not negated:
            continue
        segments = pattern.split("/")
        for i, part in enumerate(parts):
            if i >= len(segments) or segments[i] == "**":
                return True
            if not fnmatchcase(part, segments[i]):
                break
        else:
            return True
    return False


def build_context() -> list[str]:
    """The files `docker build .` would send (relative paths)."""
    rules = ignore_rules()
    files: list[str] = []
    for top, dirs, names in os.walk(ROOT):
        rel_top = Path(top).relative_to(ROOT).as_posix()
        rel_top = "" if rel_top == "." else rel_top + "/"
        dirs[:] = [
            d
            for d in dirs
            if not (ignored(rel_top + d, rules) and not could_reinclude(rel_top + d, rules))
        ]
        files.extend(rel_top + n for n in names if not ignored(rel_top + n, rules))
    return sorted(files)
