"""Weightless model folders for `--load-format dummy`, from a real config.json.

vLLM builds the real network with random weights: memory and speed are the real
model's, the text is noise. The tokenizer is a byte-level BPE without merges whose
vocabulary fills the model's size with plain (not "added") entries: it loads in a
blink (a BPE padded with ~150k added tokens takes tens of seconds), and a prompt
of N letters is N tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    # A few ids spare: transformers may append a token of its own.
    while len(vocab) < vocab_size - 8:
        vocab[f"<f{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def make(config: Path, out: Path) -> Path:
    """A model folder at `out` with `config` and a fitting tokenizer."""
    cfg = json.loads(config.read_text())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, out / "config.json")
    (out / "tokenizer.json").write_text(tokenizer_json(int(cfg["vocab_size"])))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": cfg.get("max_position_embeddings", 4096),
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def words(n: int, seed: int = 0) -> str:
    """A prompt of n tokens for these tokenizers (one token per letter)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[(seed * 7 + i * 13) % 26] for i in range(n))
