"""Loading Hugging Face models, and building the tiny word-level model of the built-in demo.

The tiny model is an ordinary HF checkpoint: a Llama or Qwen3 config with random weights, a
`PreTrainedTokenizerFast` with a chat template, saved with `save_pretrained` and loadable with
`AutoModelForCausalLM` / `AutoTokenizer`, so every later stage treats it like a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORD_PIECES = r" ?[+-]\d+| ?\d+| ?[^\W\d_]+| ?[^\s\w]+|\s+"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every byte-level word piece seen in `texts`.

    Pieces are words, numbers (a sign attached: "-8" is one token, so an operation is one token),
    punctuation runs and whitespace runs; byte-level mapping keeps the spaces inside the pieces, so
    decode(encode(x)) == x exactly for any text made of known pieces.
    """
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    pieces: set[str] = set()
    for text in texts:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    for role in ("system", "user", "assistant"):  # the chat template's own text
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(f"{role}\n"))
    pieces.update(piece for piece, _ in pre.pre_tokenize_str("\n"))
    specials = [PAD, UNK, IM_START, IM_END]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pieces))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        bos_token=None,
        additional_special_tokens=[IM_START],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    architecture: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised causal LM of a real HF architecture, sized to `tokenizer`."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if architecture == "llama":
        config = LlamaConfig(**common)
    elif architecture == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // num_heads, **common)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; use 'llama' or 'qwen3'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def check_model_path(path: str) -> None:
    """A clear FileNotFoundError for a local model path that is not there (Hugging Face would call it
    an invalid repo id); a hub id such as "Qwen/Qwen3-8B" passes through."""
    local = Path(path)
    if local.exists() and not local.is_dir():
        raise FileNotFoundError(f"model path {path} is a file; give the directory holding config.json")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise FileNotFoundError(
            f"model path {path} does not exist (train a base model first, e.g. "
            "`crisp train configs/demo/base.yaml`, or give a Hugging Face model id)"
        )


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    check_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """An HF causal LM from a local directory or hub id; weights are read as safetensors only."""
    check_model_path(path)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
    )


def save_model(model: torch.nn.Module, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
