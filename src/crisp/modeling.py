"""Loading, preparing, running and saving Hugging Face models; the tiny word-level demo model.

The tiny model is an ordinary HF checkpoint: a Llama, Qwen2 or Qwen3 config with random weights, a
`PreTrainedTokenizerFast` with a chat template, saved with `save_pretrained` and loadable with
`AutoModelForCausalLM` / `AutoTokenizer`, so every later stage treats it like a real model.

A training model may be wrapped twice: in a peft `PeftModel` (LoRA) and, once prepared by
accelerate, in DDP. Forward passes go through the outermost wrapper (DDP synchronises gradients
only for passes through its own forward); `unwrap` reaches the HF model inside for everything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from crisp.anatomy import THINK_CLOSE, THINK_OPEN

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"

# Qwen3's convention: the response opens a <think> section itself; `enable_thinking=False` closes an
# empty one in the prompt, so the model answers at once (the thinking-free mode of hybrid models).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

WORD_PIECES = r" ?[+-]\d+| ?\d+| ?[^\W\d_]+| ?[^\s\w]+|\s+"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every byte-level word piece seen in `texts`.

    Pieces are words, numbers (a sign attached: "-8" is one token, so an operation is one token),
    punctuation runs and whitespace runs; byte-level mapping keeps the spaces inside the pieces, so
    decode(encode(x)) == x exactly for any text made of known pieces.
    """
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PIECES), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    pieces: set[str] = set()
    for text in texts:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    for role in ("system", "user", "assistant"):  # the chat template's own text
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(f"{role}\n"))
    for whitespace in ("\n", "\n\n"):  # line breaks, and the blank lines around a thinking section
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(whitespace))
    specials = [PAD, UNK, IM_START, IM_END]
    vocab = {tok: i for i, tok in enumerate(specials + [THINK_OPEN, THINK_CLOSE] + sorted(pieces))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    # one token each, kept by decode(skip_special_tokens=True), as in Qwen3's tokenizer
    core.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in (THINK_OPEN, THINK_CLOSE)])
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
    elif architecture == "qwen2":
        config = Qwen2Config(**common)
    elif architecture == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // num_heads, **common)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; use 'llama', 'qwen2' or 'qwen3'")
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
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model path {path} holds no config.json: not a saved model directory")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise FileNotFoundError(
            f"model path {path} does not exist (train a base model first, e.g. "
            "`crisp train demo/base`, or give a Hugging Face model id)"
        )


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:  # neither a model folder here nor a hub model it can reach
        raise FileNotFoundError(f"model {path}: {str(exc).strip().splitlines()[0]}") from exc
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


def is_peft(model: torch.nn.Module) -> bool:
    """Whether the model (inside any DDP wrapper) is a peft PeftModel, which carries a peft_config."""
    return hasattr(unwrap(model), "peft_config")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP wrapper (a PeftModel stays a PeftModel)."""
    return extract_model_from_parallel(model)


def prepare_for_training(model: torch.nn.Module, *, gradient_checkpointing: bool = False, lora=None) -> torch.nn.Module:
    """Switch on gradient checkpointing and wrap in LoRA adapters (a config.LoraSpec) as asked."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings (LoRA) work.
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    spec = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, spec)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run a block with the model in eval mode, then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded to the longest sequence, and the attention mask (1 on real tokens)."""
    return _padded(sequences, pad_id, left=False)


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded to the longest sequence (prompts to generate from), and the attention mask."""
    return _padded(sequences, pad_id, left=True)


def _padded(sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros_like(input_ids)  # (B, T)
    for row, ids in enumerate(sequences):
        columns = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, columns] = torch.tensor(list(ids))
        attention[row, columns] = 1
    return input_ids, attention


def response_hidden(
    model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, **forward_kwargs
) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token, rows concatenated.

    Sequence b is prompt_b + response_b, right-padded; response token j sits at position
    len(prompt_b) + j and is predicted from position len(prompt_b) + j - 1. Prompts of different
    lengths (student vs teacher) therefore line up on the same response tokens.

    The pass goes through `model` itself (so a DDP wrapper sees it) with logits for the last
    position only; the decoder's output, the final normed hidden states, is caught by a hook.
    """
    input_ids, attention = right_padded([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)  # (B, T)
    rows, cols = [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        rows += [b] * len(r)
        cols += range(len(p) - 1, len(p) - 1 + len(r))
    device = next(model.parameters()).device
    caught = []
    hook = unwrap(model).get_decoder().register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            logits_to_keep=1,
            use_cache=False,
            **forward_kwargs,
        )
    finally:
        hook.remove()
    hidden = caught[0]  # (B, T, H)
    return hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, H)


def output_head(model) -> torch.nn.Module:
    """The LM head (maps (n, H) hidden states to (n, V) logits)."""
    return unwrap(model).get_output_embeddings()


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load weights saved by `save_pretrained` into `model` in place: every weight of a plain model,
    or every adapter of a PeftModel (adapter "default" at the top, others in a subfolder each)."""
    directory = Path(directory)
    if not is_peft(model):
        # read in the model's own dtype, so that a bf16 model is not loaded a second time in fp32
        dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
        model.load_state_dict(load_model(str(directory), dtype=dtype).state_dict())
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in model.peft_config:
        folder = directory if name == "default" else directory / name
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"), adapter_name=name)


def save_model(model: torch.nn.Module, tokenizer, directory: str | Path, *, state_dict: dict | None = None) -> None:
    """save_pretrained of the model and tokenizer. A PeftModel is saved as an ordinary model with the
    LoRA update merged in (what `crisp eval` loads), its adapter in `directory/adapter`; merging
    changes the model in place, so this is the last thing done with it. `state_dict` is the full
    weights where the model is sharded (FSDP)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(directory / "adapter", selected_adapters=["default"])
        model = model.merge_and_unload(adapter_names=["default"])
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
