"""What one vLLM 0.26 server uses of GPU memory: its accounting, and what it misses.

vLLM (V2 model runner, the default for dense models) checks at start that
`ceil(util * total)` bytes are free, with `total` as CUDA reports it (NVML's total
minus driver-reserved memory). Inside that budget sit the weights, the peak
activation of its profile run, non-torch allocations and the KV cache: with
`--kv-cache-memory-bytes` the KV cache is pinned, otherwise it is what the
budget leaves. Outside the budget, but in the process (and in nvidia-smi), sit
the CUDA context, the CUDA graphs and the sampler's per-sequence state; so a
server uses more than `util * total`.

Formulas follow vllm/v1/worker/gpu_worker.py, vllm/utils/mem_utils.py and
vllm/v1/core/kv_cache_utils.py; the activation, non-torch, graph and context
terms are fitted to real runs (deploy/calibration/, docs/calibration.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cohost.plan.models import ModelShape
from cohost.units import GIB, MIB

BLOCK_SIZE = 16  # vLLM's default KV block on CUDA (FlashAttention / FlashInfer)

# --- Calibration (vLLM 0.26.0, H100 80GB, CUDA 13 driver 580; docs/calibration.md) ---
# CUDA context and driver state of a server process, created before vLLM's memory
# snapshot: NVML "used" right before it was 552,402,944 bytes.
CONTEXT_BYTES = 552_402_944
# Under CUDA MPS a server is a client of the MPS server, which holds the GPU context; what
# a client still shows in nvidia-smi shrinks with its share of the SMs. Measured on an H200
# (vLLM 0.26.0, driver 580; bench/gpu/results/sharing-2026-11-29), against the same server
# without MPS: at 100% of the SMs 18-70 MiB less, at 30% 435-441 MiB less, whichever
# client started first. The plan takes the smaller saving of each and interpolates between
# them, and does not extrapolate below 30%. The MPS server process itself showed 66 MiB.
MPS_SAVING_AT_30_PERCENT = 435 * MIB
MPS_SERVER_BYTES = 66 * MIB
# Non-torch memory vLLM charged to its budget: 0.22 GiB in every run.
NON_TORCH_BYTES = round(0.22 * GIB)
# Peak activation of the profile run ~ A*T*I + B*V + C  (T = max_num_batched_tokens,
# I = intermediate size, V = vocab size; least squares over the runs, +-2% on them).
ACT_PER_TOKEN_INTERMEDIATE = 6.8
ACT_PER_VOCAB = 2120.0
ACT_CONSTANT = 36_300_000
# CUDA graphs ~ G0 + G1 * graphs * layers (graphs: PIECEWISE + FULL captures).
GRAPH_BASE = round(0.0965 * GIB)
GRAPH_PER_GRAPH_LAYER = round(1.083e-4 * GIB)


def utilization(budget_bytes: int, cuda_total_bytes: int) -> float:
    """`--gpu-memory-utilization` that covers `budget_bytes` of a card: vLLM requests
    ceil(util x total), so the fraction is rounded up, to 4 decimals."""
    return math.ceil(budget_bytes / cuda_total_bytes * 10_000) / 10_000


def dtype_bytes(weights: str) -> float:
    return {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0}.get(weights, 2.0)


def kv_dtype_bytes(kv_cache_dtype: str) -> int:
    if kv_cache_dtype in ("auto", "bf16", "fp16", "bfloat16", "float16"):
        return 2
    if kv_cache_dtype.startswith("fp8"):
        return 1
    raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r} (auto or fp8)")


def padded_vocab(shape: ModelShape) -> int:
    return math.ceil(shape.vocab_size / 64) * 64


def parameter_counts(shape: ModelShape) -> tuple[int, int, int]:
    """(embedding + lm_head, quantizable linear, other) parameters."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    vocab = padded_vocab(shape)
    embed = vocab * h * (1 if shape.tie_word_embeddings else 2)
    per_layer_linear = h * (q + 2 * kv) + q * h + 3 * h * shape.intermediate_size
    per_layer_other = 2 * h + ((q + 2 * kv) if shape.qkv_bias else 0)
    return (
        embed,
        per_layer_linear * shape.num_layers,
        per_layer_other * shape.num_layers + h,
    )


def weights_bytes(shape: ModelShape, weights: str | None = None) -> int:
    """Weights as vLLM allocates them: linear layers in the weight format, embeddings
    and lm_head in 16 bits (AWQ/GPTQ/FP8 leave them unquantized)."""
    fmt = weights or shape.weights
    embed, linear, other = parameter_counts(shape)
    # AWQ/GPTQ: int4 weights + fp16 scales and int4 zeros per group of 128.
    per_linear = 0.5 + 2 / 128 + 0.5 / 128 if fmt in ("awq", "gptq") else dtype_bytes(fmt)
    return round(embed * 2 + linear * per_linear + other * 2)


def kv_bytes_per_block(shape: ModelShape, kv_cache_dtype: str = "auto") -> int:
    """One block of every layer: 2 (K and V) x block x kv_heads x head_dim x bytes, x layers."""
    page = 2 * BLOCK_SIZE * shape.num_kv_heads * shape.head_dim * kv_dtype_bytes(kv_cache_dtype)
    return page * shape.num_layers


def blocks_per_request(shape: ModelShape, max_model_len: int, max_num_batched_tokens: int) -> int:
    """Blocks one max-length request holds, summed over layers then averaged (sliding
    windows cap a layer at window - 1 + 2 x batched tokens, as vLLM admits them)."""
    full = math.ceil(max_model_len / BLOCK_SIZE)
    total = 0
    for window in shape.layer_windows:
        if window is None:
            total += full
        else:
            capped = min(window - 1 + 2 * max_num_batched_tokens, max_model_len)
            total += math.ceil(capped / BLOCK_SIZE) + 1
    return math.ceil(total / shape.num_layers)


def kv_tokens(
    shape: ModelShape,
    kv_bytes: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    kv_cache_dtype: str = "auto",
) -> int:
    """vLLM's "GPU KV cache size: N tokens" for a KV cache of `kv_bytes`."""
    blocks = kv_bytes // kv_bytes_per_block(shape, kv_cache_dtype)
    per_request = blocks_per_request(shape, max_model_len, max_num_batched_tokens)
    return int(blocks / per_request * max_model_len) if blocks > 0 else 0


def kv_bytes_for(
    shape: ModelShape,
    sequences: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    kv_cache_dtype: str = "auto",
) -> int:
    """KV cache that holds `sequences` requests of max_model_len tokens at once."""
    blocks = sequences * blocks_per_request(shape, max_model_len, max_num_batched_tokens) + 1
    return blocks * kv_bytes_per_block(shape, kv_cache_dtype)


def cudagraph_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM 0.26's default capture sizes (config/vllm.py)."""
    largest = min(max_num_seqs * 2, 512, max_num_batched_tokens)
    sizes = [s for s in (1, 2, 4) if s <= largest]
    sizes += list(range(8, min(largest + 1, 256), 8))
    sizes += list(range(256, largest + 1, 16))
    return sizes


def cuda_graph_bytes(shape: ModelShape, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    sizes = cudagraph_sizes(max_num_seqs, max_num_batched_tokens)
    # FULL_AND_PIECEWISE: one piecewise graph per size, one full graph per decode size.
    graphs = len(sizes) + sum(1 for s in sizes if s <= max_num_seqs)
    return GRAPH_BASE + GRAPH_PER_GRAPH_LAYER * graphs * shape.num_layers


def activation_peak_bytes(shape: ModelShape, max_num_batched_tokens: int) -> int:
    return round(
        ACT_PER_TOKEN_INTERMEDIATE * max_num_batched_tokens * shape.intermediate_size
        + ACT_PER_VOCAB * padded_vocab(shape)
        + ACT_CONSTANT
    )


def sampler_state_bytes(shape: ModelShape, max_num_seqs: int) -> int:
    """V2 runner's penalty counts, prompt mask and grammar bitmask, outside the budget."""
    vocab = padded_vocab(shape)
    return 4 * max_num_seqs * vocab + 2 * 4 * max_num_seqs * math.ceil(vocab / 32)


@dataclass(frozen=True)
class Footprint:
    """One server's memory, in bytes, split the way vLLM accounts for it."""

    weights: int
    activation_peak: int
    non_torch: int
    kv_cache: int
    cuda_graphs: int
    sampler_state: int
    context: int

    @property
    def budget(self) -> int:
        """What vLLM charges to --gpu-memory-utilization."""
        return self.weights + self.activation_peak + self.non_torch + self.kv_cache

    @property
    def outside_budget(self) -> int:
        return self.cuda_graphs + self.sampler_state + self.context

    @property
    def process(self) -> int:
        """The whole server as nvidia-smi shows it."""
        return self.budget + self.outside_budget


def mps_context_bytes(sm_percent: int) -> int:
    """The context-like memory of an MPS client with this share of the SMs."""
    fraction = min(1.0, (100 - sm_percent) / 70)
    return CONTEXT_BYTES - round(MPS_SAVING_AT_30_PERCENT * fraction)


def fixed_costs(
    shape: ModelShape,
    *,
    weights: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    context: int = CONTEXT_BYTES,
) -> Footprint:
    """Everything but the KV cache; `context`: the CUDA context's share (mps_context_bytes
    for an MPS client)."""
    return Footprint(
        weights=weights_bytes(shape, weights),
        activation_peak=activation_peak_bytes(shape, max_num_batched_tokens),
        non_torch=NON_TORCH_BYTES,
        kv_cache=0,
        cuda_graphs=cuda_graph_bytes(shape, max_num_seqs, max_num_batched_tokens),
        sampler_state=sampler_state_bytes(shape, max_num_seqs),
        context=context,
    )
