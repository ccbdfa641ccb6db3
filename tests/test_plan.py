"""The planner's arithmetic against vLLM 0.26's own numbers, and its handling of bad input.

The recorded runs are real: deploy/calibration/ (servers started one at a time with a
fixed --gpu-memory-utilization on an H100) and bench/gpu/results/ (the shipped plans,
started by the launcher on H200/H100 cards shrunk to an L4 / RTX 5090).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cohost import cli, gpus
from cohost.plan import (
    PlanError,
    ServiceSpec,
    envfile,
    fit,
    make_plan,
    memory,
    models,
)
from cohost.units import GIB, MIB

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "deploy" / "calibration"
TRIALS = ROOT / "bench" / "gpu" / "results" / "trials-2026-11-22.jsonl"
# The plans those trials launched, as they were then (time-slicing; the shipped plans have
# moved on to MPS since).
TRIAL_PLANS = ROOT / "bench" / "gpu" / "results" / "plans-2026-11-22"
H100 = gpus.by_name("H100-80GB")
MODELS = ROOT / "deploy" / "models"
MISTRAL = str(MODELS / "mistralai--Mistral-7B-Instruct-v0.3")
QWEN_1_5B = str(MODELS / "Qwen--Qwen2.5-1.5B-Instruct")
QWEN_7B_AWQ = str(MODELS / "Qwen--Qwen2.5-7B-Instruct-AWQ")


def calibration_runs() -> list[dict[str, object]]:
    lines = (CALIBRATION / "h100-2026-11-22.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def trial_runs() -> list[dict[str, object]]:
    rows = [json.loads(line) for line in TRIALS.read_text().splitlines()]
    return [r for r in rows if r["both_healthy"]]


def test_h100_totals_match_what_cuda_reported() -> None:
    # torch.cuda.mem_get_info() on the calibration H100: total 85,017,493,504 bytes.
    assert H100.cuda_total_bytes == 85_017_493_504


@pytest.mark.parametrize("run", calibration_runs(), ids=lambda r: str(r["case"]))
def test_fixed_util_prediction_matches_vllm(run: dict[str, object]) -> None:
    """Given the util the run used, predict KV tokens (within 5%) and the process (3%)."""
    vllm = run["vllm"]
    assert isinstance(vllm, dict)
    spec = ServiceSpec(
        name="svc",
        model=str(CALIBRATION / "models" / str(run["arch"])),
        max_model_len=int(str(run["max_model_len"])),
        max_num_seqs=int(str(run["max_num_seqs"])),
        max_num_batched_tokens=int(str(run["max_num_batched_tokens"])),
        util=float(str(run["util"])),
    )
    service = fit(H100, [spec], mode="time-slicing").services[0]
    fp = service.footprint
    assert fp.weights / GIB == pytest.approx(vllm["weights_gib"], rel=0.04, abs=0.01)
    assert fp.activation_peak / GIB == pytest.approx(
        vllm["peak_activation_gib"], rel=0.05, abs=0.01
    )
    assert fp.cuda_graphs / GIB == pytest.approx(vllm["cuda_graph_gib"], abs=0.02)
    assert service.kv_cache_tokens == pytest.approx(vllm["kv_cache_tokens"], rel=0.05)
    if run.get("nvidia_smi_mib"):
        measured = float(str(run["nvidia_smi_mib"]))
        assert fp.process / MIB == pytest.approx(measured, rel=0.03)
        # Never below what vLLM really used: under-prediction is what causes OOM.
        assert fp.process / MIB >= measured


@pytest.mark.parametrize(
    "run", trial_runs(), ids=lambda r: f"{Path(str(r['plan'])).stem}-trial{r['trial']}"
)
def test_shipped_plans_match_the_launched_servers(run: dict[str, object]) -> None:
    plan = envfile.read(TRIAL_PLANS / Path(str(run["plan"])).name)
    measured = run["nvidia_smi_mib"]
    assert isinstance(measured, dict)
    for name in ("chatbot", "feedback"):
        p = envfile.prefix(name)
        predicted_mib = int(plan[p + "EXPECTED_PROCESS_BYTES"]) / MIB
        assert predicted_mib == pytest.approx(measured[name], rel=0.03)
        assert predicted_mib >= measured[name]
        logged = run[name]
        assert isinstance(logged, dict)
        # The KV cache is pinned: vLLM reports exactly the planned size and tokens.
        kv_gib = int(plan[p + "KV_CACHE_MEMORY_BYTES"]) / GIB
        assert logged["vllm"]["pinned_kv_gib"] == pytest.approx(kv_gib, abs=0.006)
        shape = models.load(str(MODELS / plan[p + "MODEL"].replace("/", "--")))
        tokens = memory.kv_tokens(
            shape,
            int(plan[p + "KV_CACHE_MEMORY_BYTES"]),
            int(plan[p + "MAX_MODEL_LEN"]),
            int(plan[p + "MAX_NUM_BATCHED_TOKENS"]),
        )
        assert logged["vllm"]["kv_cache_tokens"] == tokens


def test_launcher_trials_never_overlapped_starts() -> None:
    for run in trial_runs():
        events = {n: run[n]["launcher"] for n in ("chatbot", "feedback")}  # type: ignore[index]
        first, second = sorted(events.values(), key=lambda e: e["exec_at"])
        # The second server was started only once the first answered /health.
        assert second["exec_at"] >= first["healthy_at"]


def test_kv_page_follows_vllm() -> None:
    mistral = models.load(MISTRAL)
    # 2 (K, V) x 16 tokens x 8 kv heads x 128 dims x 2 bytes, for each of 32 layers.
    assert memory.kv_bytes_per_block(mistral) == 2 * 16 * 8 * 128 * 2 * 32
    assert memory.kv_bytes_per_block(mistral, "fp8") == memory.kv_bytes_per_block(mistral) // 2
    # One 8192-token sequence: 512 blocks.
    assert memory.blocks_per_request(mistral, 8192, 2048) == 512


def test_sliding_window_layers_are_capped(tmp_path: Path) -> None:
    config = json.loads((Path(MISTRAL) / "config.json").read_text())
    config["sliding_window"] = 1024
    config["layer_types"] = ["sliding_attention", "full_attention"] * 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = models.load(str(tmp_path))
    full = math.ceil(32768 / 16)
    capped = math.ceil((1024 - 1 + 2 * 2048) / 16) + 1
    assert memory.blocks_per_request(shape, 32768, 2048) == math.ceil((full + capped) / 2)


def test_awq_weights_keep_embeddings_in_16_bits() -> None:
    awq = models.load(QWEN_7B_AWQ)
    assert awq.weights == "awq"
    embed, _, _ = memory.parameter_counts(awq)
    assert embed == 2 * 152064 * 3584  # untied embedding + lm_head, 16-bit
    assert memory.weights_bytes(awq) < memory.weights_bytes(awq, "bf16") / 2.5


def test_plan_fits_and_gives_leftover_to_the_kv_caches() -> None:
    plan = make_plan(
        gpus.by_name("RTX 5090"),
        [
            ServiceSpec("chatbot", MISTRAL, max_model_len=8192, max_num_seqs=8),
            ServiceSpec("feedback", QWEN_1_5B, max_model_len=4096, max_num_seqs=32),
        ],
    )
    assert plan.fits
    chat, feedback = plan.services
    assert chat.kv_cache_tokens >= 8 * 8192
    assert feedback.kv_cache_tokens >= 32 * 4096
    assert plan.free_bytes >= plan.headroom_bytes
    assert plan.used_bytes + plan.headroom_bytes <= plan.gpu.cuda_total_bytes
    for s in plan.services:
        # The util covers the budget, as vLLM computes it: ceil(util * total).
        assert math.ceil(s.gpu_memory_utilization * plan.gpu.cuda_total_bytes) >= s.footprint.budget


def test_plan_that_does_not_fit_says_by_how_much_and_what_to_change() -> None:
    l4 = gpus.by_name("L4")
    specs = [
        ServiceSpec("chatbot", MISTRAL, max_model_len=8192, max_num_seqs=8),
        ServiceSpec("feedback", QWEN_1_5B, max_model_len=4096, max_num_seqs=32),
    ]
    plan = make_plan(l4, specs)
    assert not plan.fits
    assert plan.shortfall_bytes > 0
    assert plan.suggestions
    costs = [s.cost for s in plan.suggestions]
    assert costs == sorted(costs)
    for suggestion in plan.suggestions:
        assert fit(l4, suggestion.specs).fits, suggestion.change


def test_fixed_util_that_cannot_hold_one_sequence_is_reported() -> None:
    plan = fit(H100, [ServiceSpec("chatbot", MISTRAL, max_model_len=32768, util=0.18)])
    assert not plan.fits
    assert "one 32768-token sequence" in plan.services[0].problems[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chatbot", "expected NAME=MODEL"),
        ("chatbot=x,max_model_len", "not key=value"),
        ("chatbot=x,max_model_len=big", "not a number"),
        ("chatbot=x,colour=red", "unknown key"),
        ("chatbot=x,stream=0", "at least 1 token a chunk"),
    ],
)
def test_bad_service_specs(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        ServiceSpec.parse(text)


def test_bad_models_and_settings(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match=r"no config\.json"):
        fit(H100, [ServiceSpec("a", str(tmp_path))])
    with pytest.raises(models.ModelError, match="does not exist"):
        fit(H100, [ServiceSpec("a", str(tmp_path / "nope"))])
    with pytest.raises(models.ModelError, match="not in the local Hugging Face cache"):
        fit(H100, [ServiceSpec("a", "someone/unknown-model")])
    with pytest.raises(PlanError, match="longer than the model supports"):
        fit(H100, [ServiceSpec("a", MISTRAL, max_model_len=65536)])
    with pytest.raises(PlanError, match="must be >= max_num_seqs"):
        fit(H100, [ServiceSpec("a", MISTRAL, max_num_seqs=4096)])
    with pytest.raises(PlanError, match="util"):
        fit(H100, [ServiceSpec("a", MISTRAL, util=1.5)])
    with pytest.raises(gpus.GpuError, match="unknown GPU"):
        gpus.by_name("RTX 9999")


def test_model_from_the_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((Path(MISTRAL) / "config.json").read_text())
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert models.load("acme/tiny").architecture == "MistralForCausalLM"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_json_and_env_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    env = tmp_path / "plan.env"
    code, out, _ = run_cli(
        capsys, "plan", "--gpu", "RTX5090", "--json", "--write-env", str(env),
        "--service", f"chatbot={MISTRAL},max_model_len=8192,max_num_seqs=8",
        "--service", f"feedback={QWEN_1_5B},max_model_len=4096,max_num_seqs=32",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["fits"] is True
    keys = {
        "name", "gpu_memory_utilization", "kv_cache_memory_bytes", "kv_cache_tokens",
        "max_model_len", "max_num_seqs", "weights_bytes", "activation_peak_bytes",
        "cuda_graph_bytes", "non_torch_bytes", "process_bytes", "fits",
    }  # fmt: skip
    for service in data["services"]:
        assert keys <= service.keys()
    values = envfile.read(env)
    assert values["FEEDBACK_MAX_IN_FLIGHT"] == "32"
    assert values["CHATBOT_ENGINE_MAX_MODEL_LEN"] == "8192"
    assert float(values["CHATBOT_ENGINE_GPU_MEMORY_UTILIZATION"]) == pytest.approx(
        data["services"][0]["gpu_memory_utilization"]
    )


def test_env_file_bounds_characters_per_token_from_the_tokenizer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The shipped folders hold config.json only: no tokenizer, no bound (the worker's default).
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text((Path(QWEN_1_5B) / "config.json").read_text())
    argv = ["plan", "--gpu", "L4", "--service", f"feedback={model},max_model_len=4096"]
    env = tmp_path / "plan.env"
    assert run_cli(capsys, *argv, "--write-env", str(env))[0] == 0
    assert "FEEDBACK_MAX_CHARS_PER_TOKEN" not in envfile.read(env)
    # Byte-level BPE: {token: id}, one character per byte; added tokens count too.
    tokenizer = {
        "model": {"type": "BPE", "vocab": {"Ġthe": 0, "=" * 40: 1, "ĠĠĠĠ": 2}},
        "added_tokens": [{"id": 3, "content": "<|long_control_token|>" * 2}],
    }
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert run_cli(capsys, *argv, "--write-env", str(env))[0] == 0
    assert int(envfile.read(env)["FEEDBACK_MAX_CHARS_PER_TOKEN"]) == 44
    # Unigram (SentencePiece): [[piece, score], ...].
    unigram = {"model": {"type": "Unigram", "vocab": [["▁hello", -1.0], ["<0x41>", 0.0]]}}
    (model / "tokenizer.json").write_text(json.dumps(unigram))
    assert models.longest_token_chars(model) == 6
    (model / "tokenizer.json").write_text("{not json")
    assert models.longest_token_chars(model) is None


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--gpu", "Voodoo5", "--service", f"a={MISTRAL}"], 2, "unknown GPU"),
        (["--gpu", "L4", "--service", "a=/nonexistent"], 2, "does not exist"),
        (["--gpu", "L4", "--service", f"a={MISTRAL},max_model_len=99999"], 2, "longer than"),
        (["--gpu-memory-mib", "12", "--service", f"a={MISTRAL}"], 2, "too small"),
        (["--gpu", "L4", "--service", f"a={MISTRAL},max_num_seqs=64"], 1, "DOES NOT FIT"),
    ],
)
def test_cli_plan_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    got, out, err = run_cli(capsys, "plan", *argv)
    assert got == code
    assert message in out + err


def test_cli_refuses_to_write_a_plan_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = tmp_path / "no.env"
    code, _, err = run_cli(
        capsys, "plan", "--gpu", "L4", "--write-env", str(env),
        "--service", f"chatbot={MISTRAL},max_model_len=8192,max_num_seqs=8",
    )  # fmt: skip
    assert code == 1
    assert "does not fit" in err
    assert not env.exists()


# --------------------------------------------------------------------------- the 2026-11-29 GPU run

SHARING_RUN = ROOT / "bench" / "gpu" / "results" / "sharing-2026-11-29"


def sharing_pairs() -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (SHARING_RUN / "results.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] == "pair"]


@pytest.mark.parametrize("run", sharing_pairs(), ids=lambda r: f"{r['profile']}-{r['sharing']}")
def test_the_memory_model_covers_each_server_measured_on_the_gpu(run: dict[str, object]) -> None:
    """Both shipped profiles on an H200 held to the planned card, under time-slicing and
    under MPS: the model, with the KV cache each server was given, predicts what nvidia-smi
    showed (never less, at most 3% more), and under MPS each server stayed under its cap."""
    mps = run["sharing"] == "mps"
    name = f"{run['profile']}.env" if mps else f"{run['profile']}-time-slicing.env"
    plan = envfile.read(SHARING_RUN / "plans" / name)
    measured = run["nvidia_smi_mib"]
    assert isinstance(measured, dict)
    for service in ("chatbot", "feedback"):
        p = envfile.prefix(service)
        shape = models.load(str(MODELS / plan[p + "MODEL"].replace("/", "--")))
        sm = int(plan[p + "MPS_ACTIVE_THREAD_PERCENTAGE"]) if mps else 100
        fixed = memory.fixed_costs(
            shape,
            weights=shape.weights,
            max_num_seqs=int(plan[p + "MAX_NUM_SEQS"]),
            max_num_batched_tokens=int(plan[p + "MAX_NUM_BATCHED_TOKENS"]),
            context=memory.mps_context_bytes(sm) if mps else memory.CONTEXT_BYTES,
        )
        predicted = (fixed.process + int(plan[p + "KV_CACHE_MEMORY_BYTES"])) / MIB
        assert predicted >= measured[service], service
        assert predicted == pytest.approx(measured[service], rel=0.03), service
        if mps:
            assert measured[service] * MIB < int(plan[p + "MPS_PINNED_MEMORY_BYTES"]), service
        logged = run[service]
        assert isinstance(logged, dict)
        kv_gib = int(plan[p + "KV_CACHE_MEMORY_BYTES"]) / GIB
        assert logged["vllm"]["pinned_kv_gib"] == pytest.approx(kv_gib, abs=0.006)
    servers = {k: v for k, v in run["others_mib"].items() if "mps" in k}  # type: ignore[attr-defined]
    assert list(servers.values()) == ([memory.MPS_SERVER_BYTES // MIB] if mps else [])


@pytest.mark.parametrize("run", sharing_pairs(), ids=lambda r: f"{r['profile']}-{r['sharing']}")
def test_the_gate_started_the_servers_one_after_the_other(run: dict[str, object]) -> None:
    stamps: dict[str, dict[str, str]] = {}
    for service in ("chatbot", "feedback"):
        lines = run[service]["launcher"]  # type: ignore[index]
        stamps[service] = {
            what: line.split()[0]
            for what, needle in (("exec", "starting:"), ("healthy", "healthy after"))
            for line in lines
            if needle in line
        }
    # (The record was taken as soon as both answered: the second's keeper may not yet have
    # written its own "healthy" line.)
    first, second = sorted(stamps.values(), key=lambda s: s["exec"])
    assert second["exec"] >= first["healthy"]
