"""The Kubernetes deployment (deploy/k8s), checked with the real tools; no cluster here.

- every overlay renders with `kubectl kustomize` (the kubectl on PATH);
- the rendered objects validate against the Kubernetes schemas kubernetes-validate bundles
  (strict: unknown fields are errors), custom resources against their pinned CRDs
  (deploy/k8s/crds), and a kind with no schema is an error;
- checkov (tools/checkov's locked environment) passes each overlay, every skip with a reason;
- each overlay's generated/ files equal a fresh run of the `cohost k8s` command they record;
- the unit's wiring: `cohost launch` run with exactly what each engine container gets
  execs vLLM with the plan's flags; the feedback engine is reachable only inside its Pod;
  the API key comes from a Secret; the GPU shares hold the plan.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from cohost import gpus, nvml
from cohost.k8s import gpu as k8s_gpu
from cohost.k8s import unit as k8s_unit
from cohost.k8s.unit import UnitError
from cohost.plan import envfile
from feedback.settings import WorkerSettings

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


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda p: p.name)
def overlay(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


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


def overlay_plan(overlay: Path) -> Path:
    """The env file the overlay's generated/ files record."""
    return ROOT / recorded_command(overlay / "generated" / "plan.yaml")[1]


def recorded_command(path: Path) -> list[str]:
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("#   cohost "):
            return shlex.split(line.removeprefix("#").strip())[1:]
    raise AssertionError(f"{path} does not record the command that wrote it")


def test_every_platform_has_an_overlay() -> None:
    names = {o.name for o in OVERLAYS}
    assert any(n.startswith("gke-") for n in names), names
    assert any(n.startswith("gpu-operator") for n in names), names


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


def test_generated_files_are_the_generators_output(overlay: Path, tmp_path: Path) -> None:
    generated = overlay / "generated"
    argv = recorded_command(generated / "plan.yaml")
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
            assert "cohost-plan" in refs, name
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


def _no_inherited_settings() -> dict[str, str]:
    prefixes = (
        "CHATBOT_",
        "FEEDBACK_",
        "COHOST_",
        "PUBSUB_",
        "GOOGLE_",
        "CUDA_MPS_",
        "VIRTUAL_ENV",
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@pytest.fixture
def mps_daemon(tmp_path: Path) -> Iterator[Path]:
    """A listening control socket where the platform's MPS daemon would put it (GKE mounts
    the host's /tmp/nvidia-mps); used only when the plan asks for MPS."""
    pipe = tmp_path / "mps"
    pipe.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(pipe / "control"))
        server.listen(8)
        yield pipe


def test_engines_start_with_their_planned_flags(
    overlay: Path, rendered: list[dict[str, Any]], tmp_path: Path, mps_daemon: Path
) -> None:
    """`cohost launch` with exactly each engine container's environment, on the planned
    card (NVML faked): chatbot first on an empty GPU, then the feedback engine in what it
    leaves. Both exec vLLM with the plan's flags; the key reaches vLLM's environment only."""
    plan = envfile.read(overlay_plan(overlay))
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    free = total - gpus.DEFAULT_RESERVED
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for service in ENGINE_SERVICES:
            container = containers[f"{service}-engine"]
            assert container["args"] == [service]
            fake = tmp_path / f"{service}-nvml.json"
            fake.write_text(
                nvml.GpuReading(
                    index=0, name=plan["COHOST_GPU_NAME"], uuid="GPU-k8s-test",
                    total_bytes=total, reserved_bytes=gpus.DEFAULT_RESERVED,
                    free_bytes=free, used_bytes=total - free,
                ).to_json()
            )  # fmt: skip
            record = tmp_path / f"{service}-started.json"
            script = tmp_path / "record.py"
            script.write_text(
                "import json, os, sys\n"
                "json.dump({'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}, "
                "open(os.environ['RECORD'], 'w'))\n"
            )
            p = envfile.prefix(service)
            result = subprocess.run(
                [BIN / "cohost", "launch", *container["args"]],
                env={
                    **_no_inherited_settings(),
                    **container_env(container, rendered),
                    "COHOST_FAKE_NVML": str(fake),
                    "COHOST_LOCK_DIR": str(tmp_path / "locks"),  # the gpu-locks emptyDir
                    "CUDA_MPS_PIPE_DIRECTORY": str(mps_daemon),
                    p + "COMMAND": f"{sys.executable} {script}",
                    "RECORD": str(record),
                },
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            started = json.loads(record.read_text())
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
            free -= int(plan[p + "EXPECTED_PROCESS_BYTES"])
        free = total - gpus.DEFAULT_RESERVED
        assert free >= 0


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
        assert settings.chat_metrics_url == (
            f"http://127.0.0.1:{chatbot['CHATBOT_ENGINE_PORT']}/metrics"
        )
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


def test_engines_start_in_order_and_share_the_gate(rendered: list[dict[str, Any]]) -> None:
    """Every engine but the last is a native sidecar with a startupProbe (Kubernetes starts
    the next container only once it passed); all share one gate emptyDir."""
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        sidecars = spec["initContainers"]
        assert [c["name"] for c in sidecars] == ["chatbot-engine"]
        assert sidecars[0]["restartPolicy"] == "Always"
        probe = sidecars[0]["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800  # the gate's hold
        assert sidecars[0]["readinessProbe"]["httpGet"]["path"] == "/health"
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
        shares = {
            name: int(c["resources"]["limits"]["nvidia.com/gpu"])
            for name, c in containers.items()
            if "nvidia.com/gpu" in c["resources"].get("limits", {})
        }
        assert set(shares) == {e.container for e in unit.engines}
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


def _with(plan: Path, **extra: str) -> dict[str, str]:
    values = envfile.read(plan)
    values.update(extra)
    return values


def test_gke_mps_shares_hold_an_unequal_plan() -> None:
    """On GKE's MPS a container gets k/N of the memory: the L4 plan (chatbot 12.2 GiB,
    feedback 9.7 GiB) does not fit N = 2, so the generator finds the smallest N that does."""
    unit = k8s_unit.from_plan(_with(ROOT / "deploy" / "l4.env", COHOST_SHARING="mps"))
    request = k8s_gpu.gke(unit)
    assert request.clients_per_gpu > len(unit.engines)
    assert sum(request.shares.values()) == request.clients_per_gpu
    for e in unit.engines:
        assert request.memory_limit_bytes[e.container] >= e.cap_bytes
    # ...and it is the smallest: with one share fewer, the engines' shares add up to more.
    smaller = request.clients_per_gpu - 1
    needed = [
        next(
            (k for k in range(1, smaller + 1)
             if k8s_gpu.gke_mps_limit(k, unit.gpu_total_bytes, smaller) >= e.cap_bytes),
            smaller + 1,
        )
        for e in unit.engines
    ]  # fmt: skip
    assert sum(needed) > smaller
    # The chatbot, first in priority, gets what is left over: more of the SMs.
    assert request.shares["chatbot-engine"] >= request.shares["feedback-engine"]


def test_gke_time_sharing_is_one_share_each() -> None:
    unit = k8s_unit.from_plan(_with(ROOT / "deploy" / "l4.env", COHOST_SHARING="time-slicing"))
    request = k8s_gpu.gke(unit)
    assert request.strategy == "time-sharing"
    assert request.shares == {"chatbot-engine": 1, "feedback-engine": 1}
    assert not request.memory_limit_bytes


def test_gpu_operator_refuses_mps_shares_a_plan_cannot_use() -> None:
    """The NVIDIA device plugin's MPS gives every client total/replicas: the L4 plan's
    chatbot needs more, so MPS there is refused with the fix named."""
    unit = k8s_unit.from_plan(_with(ROOT / "deploy" / "l4.env", COHOST_SHARING="mps"))
    with pytest.raises(UnitError, match="time-slicing"):
        k8s_gpu.gpu_operator(unit)


def test_new_plan_keys_flow_through_untouched(tmp_path: Path) -> None:
    """Keys the generator does not know (the sharing issue adds some) reach the ConfigMap
    as they are, and the MPS cap, when planned, is what the shares must hold."""
    from cohost.k8s import render

    plan = tmp_path / "plan.env"
    cap = 10_000 * (1 << 20)  # above the planned 9,709 MiB: a share of the headroom
    plan.write_text(
        (ROOT / "deploy" / "l4.env").read_text()
        + "COHOST_SHARING=mps\nCOHOST_SOMETHING_NEW='a b'\n"
        + f"FEEDBACK_ENGINE_MPS_PINNED_MEMORY_BYTES={cap}\n"
    )
    out = render.files(plan, "gke", ["k8s", str(plan)])
    (configmap,) = yaml.safe_load_all(out["plan.yaml"])
    assert configmap["data"]["COHOST_SOMETHING_NEW"] == "a b"
    unit = k8s_unit.from_plan(envfile.read(plan))
    assert unit.engine("feedback").cap_bytes == cap
    assert k8s_gpu.gke(unit).memory_limit_bytes["feedback-engine"] >= cap


def test_a_plan_no_share_split_holds_is_refused(tmp_path: Path) -> None:
    values = _with(
        ROOT / "deploy" / "l4.env",
        COHOST_SHARING="mps",
        FEEDBACK_ENGINE_MPS_PINNED_MEMORY_BYTES=str(11_000 * (1 << 20)),
    )
    with pytest.raises(UnitError, match="re-plan"):
        k8s_gpu.gke(k8s_unit.from_plan(values))


# ---------------------------------------------------------------- Pub/Sub IAM for setup


def test_setup_grants_the_service_agent_once() -> None:
    from feedback.pubsub import add_member, service_agent
    from google.iam.v1 import policy_pb2

    agent = service_agent(123456789012)
    assert agent == "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"
    policy = policy_pb2.Policy()
    policy.bindings.add(role="roles/pubsub.viewer", members=["user:a@example.com"])
    assert add_member(policy, "roles/pubsub.publisher", agent) is True
    assert add_member(policy, "roles/pubsub.publisher", agent) is False  # idempotent
    assert add_member(policy, "roles/pubsub.viewer", agent) is True
    roles = {b.role: list(b.members) for b in policy.bindings}
    assert roles == {
        "roles/pubsub.viewer": ["user:a@example.com", agent],
        "roles/pubsub.publisher": [agent],
    }


def test_setup_says_what_dead_lettering_needs_without_the_project_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feedback.pubsub import grant_dead_letter_roles

    for key in list(os.environ):
        if key.startswith(("FEEDBACK_", "PUBSUB_", "GOOGLE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
    # Without the number nothing is asked of Pub/Sub: the clients are not touched.
    (hint,) = grant_dead_letter_roles(WorkerSettings(), None, None)  # type: ignore[arg-type]
    assert "FEEDBACK_PROJECT_NUMBER" in hint
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    monkeypatch.setenv("FEEDBACK_PROJECT_NUMBER", "123")
    assert grant_dead_letter_roles(WorkerSettings(), None, None) == []  # type: ignore[arg-type]
