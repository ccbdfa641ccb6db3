"""The Kubernetes deployment (deploy/k8s), checked with the real tools; no cluster here.

- every overlay renders with `kubectl kustomize` (the kubectl on PATH), as shipped and with
  its plan re-planned for the other kind of sharing (`cohost plan ... --sharing`), so both
  a time-slicing and an MPS unit go through every check below;
- the rendered objects validate against the Kubernetes schemas kubernetes-validate bundles
  (strict: unknown fields are errors), custom resources against their pinned CRDs
  (deploy/k8s/crds), and a kind with no schema is an error;
- checkov (tools/checkov's locked environment) passes each overlay, every skip with a reason;
- each overlay's generated/ files equal a fresh run of the `cohost k8s` command they record;
- the unit's wiring: `cohost launch` run with exactly what each engine container gets
  execs vLLM with the plan's flags and, under MPS, as a client of the Pod's own MPS daemon
  with the plan's share, priority and cap, and refuses to start without that daemon; the
  daemon is wired as compose's `mps` service (first, the engines' uid, their pipe directory
  and /dev/shm); a time-slicing unit runs no daemon and nothing in it waits for one; the
  worker preempts its engine calls on the chatbot's /load; the feedback engine is reachable
  only inside its Pod; the API key comes from a Secret; every container that opens the GPU
  gets one share of the same GPU.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from cohost import gpus
from cohost.k8s import gpu as k8s_gpu
from cohost.k8s import unit as k8s_unit
from cohost.k8s.unit import MPS_CONTAINER, UnitError
from cohost.launch.exits import EXIT_NO_MPS
from cohost.launch.mps import MPS_VARIABLES, NO_MPS_PIPE
from cohost.plan import envfile, sharing
from cohost.units import MIB
from feedback.settings import WorkerSettings

from harness.launcher import clean_env, fake_card, recorded, recorder
from harness.mps import FakeMpsDaemon
from tests.deployfiles import MPS, load, replan

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
CRDS = sorted((K8S / "crds").glob("*.yaml"))
CHECKOV = ROOT / "tools" / "checkov" / ".venv" / "bin" / "checkov"
# The oldest Kubernetes the manifests are written for (native sidecars are GA in 1.33)
# and the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.33.0", kv.latest_version()]
TEST_KEY = "test-key-not-a-secret"
ENGINE_SERVICES = ("chatbot", "feedback")


# ---------------------------------------------------------------- rendering


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed: .ci/run checks for it"
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def overlay_plan(overlay: Path) -> Path:
    """The env file the overlay's generated/ files record (absolute for a re-planned copy)."""
    return ROOT / envfile.command(overlay / "generated" / "plan.yaml")[1]


def sharing_of(plan: Path) -> str:
    return envfile.sharing_of(envfile.read(plan))


def other_sharing(plan: Path) -> str:
    (other,) = set(sharing.MODES) - {sharing_of(plan)}
    return other


# Each overlay as shipped (None), and with its plan re-planned for the other kind of sharing:
# whatever the shipped plans use, a time-slicing and an MPS unit are both checked.
def overlay_cases() -> list[Any]:
    cases = []
    for o in OVERLAYS:
        other = other_sharing(overlay_plan(o))
        cases += [
            pytest.param((o, None), id=o.name),
            pytest.param((o, other), id=f"{o.name}-{other}"),
        ]
    return cases


@pytest.fixture(scope="module", params=overlay_cases())
def overlay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The overlay's folder: the shipped one, or a copy of deploy/k8s whose overlay has
    generated/ written by the command it records from the re-planned env file."""
    shipped: Path
    mode: str | None
    shipped, mode = request.param
    if mode is None:
        return shipped
    root = tmp_path_factory.mktemp(f"{shipped.name}-{mode}")
    shutil.copytree(K8S, root / "k8s")
    copy = root / "k8s" / "overlays" / shipped.name
    plan = replan(overlay_plan(shipped), mode, root / f"{mode}.env")
    argv = envfile.command(shipped / "generated" / "plan.yaml")
    assert argv[0] == "k8s", argv
    argv[1] = str(plan)
    argv[argv.index("--write") + 1] = str(copy / "generated")
    shutil.rmtree(copy / "generated")
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return copy


@pytest.fixture(scope="module")
def rendered(overlay: Path) -> list[dict[str, Any]]:
    return kustomize(overlay)


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def units(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in objects(docs, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/name") == "cohost-unit"
    }


def pod_containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def gpu_shares(deployment: dict[str, Any]) -> dict[str, int]:
    """Container -> nvidia.com/gpu, for every container that requests the GPU."""
    return {
        name: int(c["resources"]["limits"]["nvidia.com/gpu"])
        for name, c in pod_containers(deployment).items()
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    }


def volume_at(container: dict[str, Any], path: str) -> str | None:
    """The Pod volume that `path` lives in, inside `container` (its mount), if any."""
    mounts = [
        m for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    return max(mounts, key=lambda m: len(m["mountPath"]))["name"] if mounts else None


def env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def run_as_user(deployment: dict[str, Any], container: dict[str, Any]) -> int:
    pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
    uid: int = container.get("securityContext", {}).get("runAsUser", pod.get("runAsUser"))
    return uid


def overlay_sharing(overlay: Path) -> str:
    return sharing_of(overlay_plan(overlay))


def test_every_platform_has_an_overlay() -> None:
    names = {o.name for o in OVERLAYS}
    assert any(n.startswith("gke-") for n in names), names
    assert any(n.startswith("gpu-operator") for n in names), names


def test_overlays_ship_the_default_sharing() -> None:
    """The shipped overlays are generated from plans with `cohost plan`'s default sharing
    (time-slicing, with the worker's preemption); the other kind is checked re-planned."""
    for o in OVERLAYS:
        assert overlay_sharing(o) == sharing.DEFAULT_MODE, o.name


# ---------------------------------------------------------------- schemas


def strict(schema: Any) -> Any:
    """What the API server prunes (unknown fields) becomes an error: every object schema
    that lists its properties and does not preserve unknown fields allows no others."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # The API server checks apiVersion, kind and metadata itself.
                schema["properties"].setdefault("metadata", {"type": "object"})
                schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


CRD_SCHEMAS = crd_schemas()


def schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft7Validator(CRD_SCHEMAS[key])
        return [
            f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)
        ]
    try:
        kv.validate(doc, version, True)
    except kv.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kv.SchemaNotFoundError:
        # kubernetes-validate only warns here; a kind nobody can check is an error.
        return [f"{name}: no schema for {key} (pin its CRD in deploy/k8s/crds)"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_match_their_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    errors = [e for doc in rendered for e in schema_errors(doc, version)]
    assert not errors, "\n".join(errors)
    assert {d["kind"] for d in rendered} >= {
        "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject",
        "TriggerAuthentication", "ConfigMap", "ServiceAccount",
    }  # fmt: skip


def test_schema_check_rejects_what_it_should() -> None:
    """The checks above can fail: a misspelt field, a number where KEDA wants a string, an
    unknown auth provider and a kind without a schema are all refused."""
    docs = kustomize(OVERLAYS[0])
    deployment = copy.deepcopy(next(iter(units(docs).values())))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    scaled = copy.deepcopy(next(iter(objects(docs, "ScaledObject").values())))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    auth = copy.deepcopy(next(iter(objects(docs, "TriggerAuthentication").values())))
    auth["spec"]["podIdentity"]["provider"] = "gke"
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    for bad in (deployment, scaled, auth, unknown):
        assert schema_errors(bad, KUBERNETES_VERSIONS[0]), bad["kind"]


def test_cluster_files_match_their_schemas() -> None:
    for path in sorted(K8S.glob("overlays/*/generated/cluster/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not schema_errors(doc, KUBERNETES_VERSIONS[0]), path


# ---------------------------------------------------------------- security linter


def checkov(directory: Path) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail("checkov is not installed: uv sync --frozen --project tools/checkov")
    result = subprocess.run(
        [CHECKOV, "--directory", str(directory), "--framework", "kustomize",
         "--skip-download", "--compact", "--output", "json"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-4000:]
    report = json.loads(result.stdout)
    (kustomize_report,) = report if isinstance(report, list) else [report]
    assert kustomize_report["check_type"] == "kustomize"
    assert result.returncode == (1 if kustomize_report["summary"]["failed"] else 0)
    found: dict[str, Any] = kustomize_report
    return found


def test_checkov_passes(overlay: Path) -> None:
    report = checkov(overlay)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0, failed
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100, summary  # it did check the units
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason) > 20, f"{skipped['check_id']} skipped without a reason"


def test_checkov_finds_a_privilege_escalation(tmp_path: Path) -> None:
    """The linter run above can fail: the same overlay with one container allowed to
    escalate privileges does."""
    shutil.copytree(K8S, tmp_path / "k8s")
    unit = tmp_path / "k8s" / "base" / "unit" / "deployment.yaml"
    text = unit.read_text()
    assert text.count("allowPrivilegeEscalation: false") >= 2
    unit.write_text(
        text.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", 1)
    )
    report = checkov(tmp_path / "k8s" / "overlays" / OVERLAYS[0].name)
    assert "CKV_K8S_20" in {c["check_id"] for c in report["results"]["failed_checks"]}


def test_every_skip_names_a_check_and_a_reason(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith("CKV"), value
                assert len(reason) > 20, value


# ---------------------------------------------------------------- generated from the plan


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)  # the shipped ones
def test_generated_files_are_the_generators_output(overlay: Path, tmp_path: Path) -> None:
    generated = overlay / "generated"
    argv = envfile.command(generated / "plan.yaml")
    assert argv[0] == "k8s"
    where = argv.index("--write") + 1
    assert (ROOT / argv[where]).resolve() == generated.resolve(), "it records another folder"
    fresh = tmp_path / "generated"
    argv[where] = str(fresh)
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    ours = {p.relative_to(generated) for p in generated.rglob("*") if p.is_file()}
    theirs = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    assert ours == theirs
    recorded = str(generated.relative_to(ROOT))
    for rel in ours:
        assert (fresh / rel).read_text().replace(str(fresh), recorded) == (
            generated / rel
        ).read_text(), rel


def test_plan_reaches_every_unit_unchanged(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    plan = envfile.read(overlay_plan(overlay))
    assert objects(rendered, "ConfigMap")["cohost-plan"]["data"] == plan
    for deployment in units(rendered).values():
        for name, container in pod_containers(deployment).items():
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
            # Every container that runs cohost reads the plan; the MPS daemon needs none of
            # it (each client sets its own share when it starts).
            assert ("cohost-plan" in refs) == (name != MPS_CONTAINER), name
            # Nothing overrides a planned value.
            assert not {e["name"] for e in container.get("env", [])} & plan.keys(), name


# ---------------------------------------------------------------- the unit's wiring


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """What the container starts with: envFrom ConfigMaps, then env (Secrets given the
    test key; optional Secrets left out, as when they do not exist)."""
    maps = objects(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        secret = item["valueFrom"]["secretKeyRef"]
        if not secret.get("optional"):
            env[item["name"]] = TEST_KEY
    return env


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, Path]:
    """A directory for each emptyDir of the unit Pod, made on first use: what a container
    sees at a mount, the others see at theirs."""

    class Dirs(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            path = tmp_path / "volumes" / name
            path.mkdir(parents=True)
            self[name] = path
            return path

    return Dirs()


@pytest.fixture
def mps_daemon(rendered: list[dict[str, Any]], volumes: dict[str, Path]) -> Iterator[Path | None]:
    """The unit's MPS daemon, as its clients find it: its control socket in the volume at
    the daemon container's CUDA_MPS_PIPE_DIRECTORY. Yields that volume's directory, or None
    when the units run no daemon (a time-slicing plan)."""
    daemons = [pod_containers(d).get(MPS_CONTAINER) for d in units(rendered).values()]
    if not any(daemons):
        yield None
        return
    (same,) = {json.dumps(d, sort_keys=True) for d in daemons}  # the same in every unit
    container = json.loads(same)
    pipe = env_value(container, "CUDA_MPS_PIPE_DIRECTORY")
    assert pipe, "the daemon names no pipe directory"
    volume = volume_at(container, pipe)
    assert volume, f"the daemon's pipe directory {pipe} is on no volume"
    with FakeMpsDaemon(volumes[volume]) as fake:
        yield fake.pipe


def launch(
    container: dict[str, Any],
    docs: list[dict[str, Any]],
    volumes: dict[str, Path],
    tmp_path: Path,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """`cohost launch` with exactly the container's environment, its pipe directory
    where its volume is here."""
    env = container_env(container, docs)
    pipe = env.get("CUDA_MPS_PIPE_DIRECTORY")
    if pipe is not None:
        volume = volume_at(container, pipe)
        assert volume, f"{container['name']}: {pipe} is on no volume"
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(volumes[volume])
    return subprocess.run(
        [BIN / "cohost", "launch", *container["args"]],
        env={
            **clean_env(),
            **env,
            "COHOST_LOCK_DIR": str(tmp_path / "locks"),  # the gpu-locks emptyDir
            **extra,
        },
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_engines_start_with_their_planned_flags(
    overlay: Path,
    rendered: list[dict[str, Any]],
    tmp_path: Path,
    volumes: dict[str, Path],
    mps_daemon: Path | None,
) -> None:
    """`cohost launch` with exactly each engine container's environment, on the planned
    card (NVML faked): chatbot first on an empty GPU, then the feedback engine in what it
    leaves. Both exec vLLM with the plan's flags; the key reaches vLLM's environment only.
    Under MPS each is a client of the Pod's own daemon (its pipe directory is the daemon's
    volume) with the plan's share of the SMs, priority and memory cap; under time-slicing
    the Pod has no daemon and each starts without one, kept out of MPS."""
    plan = envfile.read(overlay_plan(overlay))
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    free = total - gpus.DEFAULT_RESERVED
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for service in ENGINE_SERVICES:
            container = containers[f"{service}-engine"]
            assert container["args"] == [service]
            fake = fake_card(plan, free, tmp_path / f"{service}-nvml.json", uuid="GPU-k8s-test")
            record = tmp_path / f"{service}-started.json"
            p = envfile.prefix(service)
            result = launch(
                container, rendered, volumes, tmp_path,
                COHOST_FAKE_NVML=str(fake),
                COHOST_MPS_WAIT_S="5",  # the daemon is there: a wrong directory fails fast
                **{p + "COMMAND": recorder(record)},
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            started = recorded(record)
            flags = dict(zip(started["argv"][0::2], started["argv"][1::2], strict=False))
            assert flags["--model"] == plan[p + "MODEL"]
            assert flags["--served-model-name"] == plan[p + "SERVED_MODEL_NAME"]
            assert flags["--max-model-len"] == plan[p + "MAX_MODEL_LEN"]
            assert flags["--max-num-seqs"] == plan[p + "MAX_NUM_SEQS"]
            assert flags["--max-num-batched-tokens"] == plan[p + "MAX_NUM_BATCHED_TOKENS"]
            if p + "KV_CACHE_MEMORY_BYTES" in plan:
                assert flags["--kv-cache-memory-bytes"] == plan[p + "KV_CACHE_MEMORY_BYTES"]
            if service == "chatbot":
                assert (flags["--host"], flags["--port"]) == ("0.0.0.0", "8000")
                assert started["key"] == TEST_KEY
                assert TEST_KEY not in " ".join(started["argv"]) + result.stderr
            else:
                # Loopback only: the feedback engine cannot be reached from outside its Pod.
                assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "8002")
                assert started["key"] is None
            mps = started["mps"]
            if plan.get("COHOST_SHARING") == "mps":
                assert mps_daemon is not None, "an MPS unit without its daemon"
                assert mps == {
                    "CUDA_MPS_PIPE_DIRECTORY": str(mps_daemon),  # the daemon's volume
                    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": plan[p + "MPS_ACTIVE_THREAD_PERCENTAGE"],
                    "CUDA_MPS_CLIENT_PRIORITY": plan[p + "MPS_CLIENT_PRIORITY"],
                    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT":
                        f"0={int(plan[p + 'MPS_PINNED_MEMORY_BYTES']) // MIB}M",
                }, service  # fmt: skip
            else:
                assert mps_daemon is None, "a time-slicing unit runs no MPS daemon"
                assert mps == {"CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
            free -= int(plan[p + "EXPECTED_PROCESS_BYTES"])
        free = total - gpus.DEFAULT_RESERVED
        assert free >= 0


def test_engines_refuse_to_start_without_the_daemon(
    overlay: Path, rendered: list[dict[str, Any]], tmp_path: Path, volumes: dict[str, Path]
) -> None:
    """Under MPS an engine whose pipe directory holds no daemon does not start vLLM (which
    would run without its share and cap, silently): `cohost launch` refuses, exit 6."""
    plan = envfile.read(overlay_plan(overlay))
    if plan.get("COHOST_SHARING") != "mps":
        pytest.skip("a time-slicing plan uses no daemon")
    half = int(plan["COHOST_GPU_TOTAL_BYTES"]) // 2
    fake = fake_card(plan, half, tmp_path / "nvml.json", uuid="GPU-k8s-test")
    marker = tmp_path / "vllm-ran"
    for name, deployment in units(rendered).items():
        for service in ENGINE_SERVICES:
            container = pod_containers(deployment)[f"{service}-engine"]
            result = launch(
                container, rendered, volumes, tmp_path,
                COHOST_FAKE_NVML=str(fake), COHOST_MPS_WAIT_S="0",
                # Each Pod has its own gpu-locks emptyDir, where the launcher counts its
                # refusals in a row (a second one would wait before exiting).
                COHOST_LOCK_DIR=str(tmp_path / "locks" / name),
                **{envfile.prefix(service) + "COMMAND": f"touch {marker}"},
            )  # fmt: skip
            assert result.returncode == EXIT_NO_MPS, result.stderr
            assert "no MPS control daemon" in result.stderr
            assert not marker.exists()


def test_only_an_mps_unit_runs_the_daemon(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    """An MPS plan's unit runs the daemon, with a GPU share; a time-slicing plan's runs none,
    requests no share for it, and nothing in its Pod still refers to it: the chatbot engine
    is the first container to start, and no command or probe talks to a daemon."""
    mps = overlay_sharing(overlay) == "mps"
    for name, deployment in units(rendered).items():
        containers = pod_containers(deployment)
        assert (MPS_CONTAINER in containers) == mps, name
        assert (MPS_CONTAINER in gpu_shares(deployment)) == mps, name
        first = deployment["spec"]["template"]["spec"]["initContainers"][0]["name"]
        assert first == (MPS_CONTAINER if mps else "chatbot-engine"), name
        if not mps:
            assert "nvidia-cuda-mps-control" not in json.dumps(deployment), name


def test_mps_daemon_is_wired_like_compose(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    """The unit's own MPS daemon, as compose's `mps` service: a native sidecar started
    before every other container, from the engine image, as the engines' uid, with a
    startup probe that asks the daemon itself. Every other container that opens the GPU
    shares its pipe directory (at its own CUDA_MPS_PIPE_DIRECTORY) and its /dev/shm: none
    can reach the GPU but through the daemon's directory."""
    if overlay_sharing(overlay) != "mps":
        pytest.skip("a time-slicing unit runs no daemon (test_only_an_mps_unit_runs_the_daemon)")
    compose_mps = load(MPS)["services"]["mps"]  # compose.mps.yml, for MPS plans
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        daemon = spec["initContainers"][0]
        assert daemon["name"] == MPS_CONTAINER
        assert daemon["restartPolicy"] == "Always"
        assert " ".join(daemon["command"]).endswith("exec nvidia-cuda-mps-control -f")
        probe = " ".join(daemon["startupProbe"]["exec"]["command"])
        assert probe.endswith(" ".join(compose_mps["healthcheck"]["test"][1:]))
        assert "quit" in " ".join(daemon["lifecycle"]["preStop"]["exec"]["command"])
        engines = {n: c for n, c in pod_containers(deployment).items() if n.endswith("-engine")}
        assert {daemon["image"]} == {c["image"] for c in engines.values()}
        # The MPS server runs as its clients' uid and the daemon starts it: one uid.
        uids = {run_as_user(deployment, c) for c in [daemon, *engines.values()]}
        assert len(uids) == 1, uids
        assert uids.pop() >= 10000

        volumes = {v["name"]: v for v in spec["volumes"]}
        pipe_dir = env_value(daemon, "CUDA_MPS_PIPE_DIRECTORY")
        assert pipe_dir
        pipe = volume_at(daemon, pipe_dir)
        assert pipe
        assert "emptyDir" in volumes[pipe]
        log_dir = env_value(daemon, "CUDA_MPS_LOG_DIRECTORY")
        assert log_dir
        assert volume_at(daemon, log_dir) == pipe
        shm = volume_at(daemon, "/dev/shm")
        assert shm
        assert volumes[shm]["emptyDir"]["medium"] == "Memory"
        # Sized as compose sizes the /dev/shm the daemon shares with the engines.
        size = compose_mps["shm_size"].lower()
        assert size.endswith("gb"), size
        assert volumes[shm]["emptyDir"]["sizeLimit"] == f"{size[:-2]}Gi"

        shares = gpu_shares(deployment)
        assert MPS_CONTAINER in shares, "the daemon must see the GPU its clients use"
        order = [c["name"] for c in [*spec["initContainers"], *spec["containers"]]]
        for name in set(shares) - {MPS_CONTAINER}:
            container = pod_containers(deployment)[name]
            client_dir = env_value(container, "CUDA_MPS_PIPE_DIRECTORY")
            assert client_dir, name
            assert volume_at(container, client_dir) == pipe, name
            assert volume_at(container, "/dev/shm") == shm, name
            assert order.index(name) > order.index(MPS_CONTAINER), name
        # The daemon holds no plan and no MPS limits of its own: each client sets its own.
        assert not any(e["name"] in MPS_VARIABLES for e in daemon.get("env", []))


def test_worker_talks_to_its_own_engines(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for key in list(os.environ):
            if key.startswith(("FEEDBACK_", "PUBSUB_", "GOOGLE_")):
                monkeypatch.delenv(key)
        for key, value in container_env(containers["feedback-worker"], rendered).items():
            monkeypatch.setenv(key, value)
        settings = WorkerSettings()
        engine = container_env(containers["feedback-engine"], rendered)
        chatbot = container_env(containers["chatbot-engine"], rendered)
        assert settings.llm_base_url == (
            f"http://{engine['FEEDBACK_ENGINE_HOST']}:{engine['FEEDBACK_ENGINE_PORT']}/v1"
        )
        # Chat first, under either kind of plan, as in compose: the worker reads the chatbot
        # engine's /load on its port in this Pod and preempts its engine calls while chat
        # has requests (docs/sharing.md).
        port = chatbot["CHATBOT_ENGINE_PORT"]
        assert port == "8000"
        assert str(containers["chatbot-engine"]["ports"][0]["containerPort"]) == port
        assert settings.chat_metrics_url == f"http://127.0.0.1:{port}/load"
        assert settings.preempting()
        assert settings.llm_model == engine["FEEDBACK_ENGINE_SERVED_MODEL_NAME"]
        assert settings.max_in_flight == int(engine["FEEDBACK_ENGINE_MAX_NUM_SEQS"])
        assert settings.project_id() == "my-project"
        assert settings.pubsub_emulator_host is None


def test_feedback_engine_is_not_exposed(rendered: list[dict[str, Any]]) -> None:
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        engine = containers["feedback-engine"]
        assert "ports" not in engine
        assert container_env(engine, rendered)["FEEDBACK_ENGINE_HOST"] == "127.0.0.1"
        assert not deployment["spec"]["template"]["spec"].get("hostNetwork")
    chat_port = 8000
    for service in objects(rendered, "Service").values():
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [chat_port]
        assert service["spec"]["selector"]["cohost.dev/role"] == "chat"
    (policy,) = objects(rendered, "NetworkPolicy").values()
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {chat_port, 9100}
    chat = units(rendered)["unit-chat"]
    assert pod_containers(chat)["chatbot-engine"]["ports"][0]["containerPort"] == chat_port


def test_api_key_comes_from_a_secret(rendered: list[dict[str, Any]]) -> None:
    for deployment in units(rendered).values():
        for name, container in pod_containers(deployment).items():
            for item in container.get("env", []):
                if item["name"].endswith(("API_KEY", "TOKEN", "SECRET", "PASSWORD")):
                    assert "value" not in item, f"{name}: {item['name']} written in the manifest"
                    assert item["valueFrom"]["secretKeyRef"]["name"], name
        env = pod_containers(deployment)["chatbot-engine"]["env"]
        key = next(e for e in env if e["name"] == "CHATBOT_ENGINE_API_KEY")
        assert key["valueFrom"]["secretKeyRef"] == {"name": "cohost-chatbot", "key": "api-key"}
    assert "Secret" not in {d["kind"] for d in rendered}, "no secret is shipped"


def test_every_engine_can_fetch_a_gated_model(rendered: list[dict[str, Any]]) -> None:
    """As in compose, both engines read HF_TOKEN from the optional cohost-hf Secret."""
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for service in ENGINE_SERVICES:
            env = {e["name"]: e for e in containers[f"{service}-engine"]["env"]}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "cohost-hf", "key": "token", "optional": True,
            }, service  # fmt: skip


def test_engines_start_in_order_and_share_the_gate(
    overlay: Path, rendered: list[dict[str, Any]]
) -> None:
    """The MPS daemon (MPS plans) and every engine but the last are native sidecars with a
    startupProbe (Kubernetes starts the next container only once it passed); the engines
    share one gate emptyDir."""
    daemon = [MPS_CONTAINER] if overlay_sharing(overlay) == "mps" else []
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        sidecars = spec["initContainers"]
        assert [c["name"] for c in sidecars] == [*daemon, "chatbot-engine"]
        assert {c["restartPolicy"] for c in sidecars} == {"Always"}
        assert all("startupProbe" in c for c in sidecars)
        chatbot = sidecars[-1]
        probe = chatbot["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800  # the gate's hold
        assert chatbot["readinessProbe"]["httpGet"]["path"] == "/health"
        engines = [c for c in pod_containers(deployment).values() if c["name"].endswith("-engine")]
        assert len(engines) == len(ENGINE_SERVICES)
        gates = {
            m["name"]
            for c in engines
            for m in c["volumeMounts"]
            if m["mountPath"] == "/var/lock/cohost"
        }
        assert len(gates) == 1
        (gate,) = gates
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == gate)
        assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_unit_takes_every_share_of_one_gpu(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    unit = k8s_unit.from_plan(envfile.read(overlay_plan(overlay)))
    platform = "gke" if overlay.name.startswith("gke") else "gpu-operator"
    request = k8s_gpu.request(unit, platform)  # type: ignore[arg-type]
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        containers = pod_containers(deployment)
        shares = gpu_shares(deployment)
        # Every engine, and the daemon under MPS, one share each (time-slicing allows no more).
        daemon = [MPS_CONTAINER] if unit.sharing == "mps" else []
        assert shares == dict.fromkeys([*daemon, "chatbot-engine", "feedback-engine"], 1)
        # All N shares: no other Pod can land on this GPU.
        assert sum(shares.values()) == request.clients_per_gpu
        labels = spec["nodeSelector"]
        clients_label = next(
            v for k, v in labels.items() if "max-shared-clients" in k or k.endswith("gpu.replicas")
        )
        assert int(clients_label) == request.clients_per_gpu
        for name, c in containers.items():
            assert c["resources"]["requests"]["cpu"], name
            assert c["resources"]["limits"]["memory"], name


def test_security_context(rendered: list[dict[str, Any]]) -> None:
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] >= 10000
        assert spec["automountServiceAccountToken"] is False
        for name, c in pod_containers(deployment).items():
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("privileged"), name


# ---------------------------------------------------------------- GPU shares from the plan


@pytest.fixture(scope="module")
def l4_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """deploy/l4.env's command re-run for each kind of sharing: mode -> its env file."""
    where = tmp_path_factory.mktemp("l4-plans")
    return {m: replan(ROOT / "deploy" / "l4.env", m, where / f"l4-{m}.env") for m in sharing.MODES}


@pytest.mark.parametrize("mode", sharing.MODES)
@pytest.mark.parametrize("platform", k8s_gpu.PLATFORMS)
def test_platforms_only_give_every_gpu_container_the_gpu(
    mode: str, platform: str, l4_plans: dict[str, Path]
) -> None:
    """Whatever the plan, the platform time-slices one share per GPU container and sets no
    MPS limit of its own. Under MPS those are the daemon and each engine, and the unit's
    daemon applies the plan's unequal, overlapping shares (the platform's own MPS would
    couple or equalize them, gpu.py); under time-slicing the engines alone."""
    unit = k8s_unit.from_plan(envfile.read(l4_plans[mode]))
    assert unit.sharing == mode
    request = k8s_gpu.request(unit, platform)  # type: ignore[arg-type]
    assert request.strategy == {"gke": "time-sharing", "gpu-operator": "time-slicing"}[platform]
    engines = ("chatbot-engine", "feedback-engine")
    expected = (MPS_CONTAINER, *engines) if mode == "mps" else engines
    assert unit.gpu_containers == expected
    assert request.shares == dict.fromkeys(expected, 1)
    assert request.clients_per_gpu == len(expected)
    assert "mps" not in request.node_labels.values()


@pytest.mark.parametrize("platform", k8s_gpu.PLATFORMS)
def test_unit_patch_keeps_the_daemon_only_for_an_mps_plan(
    platform: str, l4_plans: dict[str, Path]
) -> None:
    """generated/unit-gpu.yaml: under MPS the daemon gets its share and is printed with it;
    under time-slicing the patch deletes the base's daemon container (strategic merge) and
    neither its shares nor its header count it."""
    from cohost.k8s import render

    for mode, plan in l4_plans.items():
        text = render.files(plan, platform, ["k8s", str(plan)])["unit-gpu.yaml"]  # type: ignore[arg-type]
        (patch,) = yaml.safe_load_all(text)
        init = patch["spec"]["template"]["spec"]["initContainers"]
        header = [line for line in text.splitlines() if line.startswith("#")]
        daemon_lines = [line for line in header if line.startswith(f"#   {MPS_CONTAINER}:")]
        if mode == "mps":
            assert init[0] == {
                "name": MPS_CONTAINER, "resources": {"limits": {"nvidia.com/gpu": 1}},
            }  # fmt: skip
            assert len(daemon_lines) == 1
            assert "3 shares per GPU" in text
        else:
            assert init[0] == {"name": MPS_CONTAINER, "$patch": "delete"}
            assert not daemon_lines
            assert "2 shares per GPU" in text
        assert [c["name"] for c in init[1:]] == ["chatbot-engine"]


@pytest.mark.parametrize("mode", sharing.MODES)
def test_gpu_operator_config_time_slices_every_plan(mode: str, l4_plans: dict[str, Path]) -> None:
    from cohost.k8s import render

    out = render.files(l4_plans[mode], "gpu-operator", ["k8s"])
    (configmap,) = yaml.safe_load_all(out["cluster/device-plugin-config.yaml"])
    (config,) = configmap["data"].values()
    shared = yaml.safe_load(config)["sharing"]
    assert list(shared) == ["timeSlicing"]
    replicas = 3 if mode == "mps" else 2  # one per GPU container
    assert shared["timeSlicing"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": replicas}]
    assert shared["timeSlicing"]["failRequestsGreaterThanOne"] is True


def test_new_plan_keys_flow_through_untouched(tmp_path: Path, l4_plans: dict[str, Path]) -> None:
    """Keys the generator does not know reach the ConfigMap as they are, and the MPS cap,
    when planned, is what the unit reads as the engine's memory."""
    from cohost.k8s import render

    plan = tmp_path / "plan.env"
    cap = 10_000 * (1 << 20)
    plan.write_text(
        l4_plans["mps"].read_text()
        + "COHOST_SOMETHING_NEW='a b'\n"
        + f"FEEDBACK_ENGINE_MPS_PINNED_MEMORY_BYTES={cap}\n"
    )
    out = render.files(plan, "gke", ["k8s", str(plan)])
    (configmap,) = yaml.safe_load_all(out["plan.yaml"])
    assert configmap["data"]["COHOST_SOMETHING_NEW"] == "a b"
    unit = k8s_unit.from_plan(envfile.read(plan))
    assert unit.engine("feedback").cap_bytes == cap
    assert "limit 10,000 MiB" in out["unit-gpu.yaml"]


def test_an_mps_plan_without_an_engines_share_is_refused(l4_plans: dict[str, Path]) -> None:
    """What `cohost launch` would refuse at the Pod's start is refused when rendering."""
    values = envfile.read(l4_plans["mps"])
    del values["FEEDBACK_ENGINE_MPS_CLIENT_PRIORITY"]
    with pytest.raises(UnitError, match=r"FEEDBACK_ENGINE_MPS_CLIENT_PRIORITY.*Re-plan"):
        k8s_unit.from_plan(values)
    # A time-slicing plan needs none.
    values["COHOST_SHARING"] = "time-slicing"
    assert k8s_unit.from_plan(values).sharing == "time-slicing"
