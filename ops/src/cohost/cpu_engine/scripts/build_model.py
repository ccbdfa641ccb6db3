"""Build a model folder vLLM can serve: config.json, model.safetensors, tokenizer files.

    python build_model.py KIND GGUF OUT TEMPLATE TINY_CONFIG_JSON

Runs in the engine venv (torch, transformers, gguf). KIND `smollm2`: SmolLM2's GGUF
weights unpacked to dense bf16; KIND `tiny`: a random-weight Llama of the shape in
TINY_CONFIG_JSON with the same tokenizer. TEMPLATE is the chat template to use when the
GGUF carries none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig


def smollm2(gguf: Path) -> Any:
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
    return model


def tiny_llama(tok: Any, shape: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **shape,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


def main(kind: str, gguf: Path, out: Path, template: str, tiny: str) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print("chat template from GGUF:", repr(tok.chat_template))
    if not tok.chat_template:
        tok.chat_template = template
    print(
        "tokenizer:", type(tok).__name__, "vocab", len(tok), "eos", tok.eos_token,
        tok.eos_token_id, "bos", tok.bos_token, tok.bos_token_id,
    )  # fmt: skip
    model = smollm2(gguf) if kind == "smollm2" else tiny_llama(tok, json.loads(tiny))
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


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5])
