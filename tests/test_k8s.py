"""The Kubernetes manifests (deploy/k8s) made from the plan, checked with the real tools; no
cluster here.

Every overlay is rendered with `kubectl kustomize` (the kubectl on PATH), as shipped and with
its plan re-planned for the other kind of sharing (`cohost plan ... --sharing`; the `overlay`
and `rendered` fixtures, tests/conftest.py), so both a time-slicing and an MPS unit go
through every check below:

- every platform has an overlay, and the shipped ones are planned with the default sharing;
- the rendered objects validate against the Kubernetes schemas kubernetes-validate bundles
  (strict: unknown fields are errors), custom resources against their pinned CRDs
  (deploy/k8s/crds), and a kind with no schema is an error;
- checkov (tools/checkov's locked environment) passes each overlay, every skip with a reason;
- each overlay's generated/ files equal a fresh run of the `cohost k8s` command they record,
  and the plan reaches every unit's containers unchanged;
- the feedback engine is reachable only inside its Pod; the API key comes from a Secret and
  a gated model's token from an optional one; every container that opens the GPU gets one
  share of the same GPU; the Pods' security contexts;
- the GPU shares each platform is asked for, under a plan of either kind.

What runs inside a unit's Pod (its engines, the MPS daemon, the worker) is
tests/test_k8s_unit.py's.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from cohost.k8s import gpu as k8s_gpu
from cohost.k8s import unit as k8s_unit
from cohost.k8s.unit import MPS_CONTAINER, UnitError
from cohost.plan import envfile, sharing

from tests.deployfiles import BIN, ROOT, replan
from tests.k8sfiles import (
    CHECKOV,
    CRDS,
    ENGINE_SERVICES,
    K8S,
    OVERLAYS,
    container_env,
    gpu_shares,
    kustomize,
    objects,
    overlay_plan,
    overlay_sharing,
    pod_containers,
    units,
)

# The oldest Kubernetes the manifests are written for (native sidecars are GA in 1.33)
# and the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.33.0", kv.latest_version()]


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


# ---------------------------------------------------------------- the units' objects


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
