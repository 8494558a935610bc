"""Generation backends behind one small interface.

A backend turns prompt token ids into `Rollout`s: the response token ids (EOS included when the
model stopped), the decoded text, and why it stopped. The HF backend batches prompts with left
padding and uses the KV cache; another backend (e.g. vLLM) only has to implement `generate`.

Sampling is seeded per request, not per call: sample j of prompt i draws its noise from
(seed, first_index + i, j, position) alone. The same prompt therefore gets the same rollout
whichever batch, generation chunk or data-parallel rank it lands in, so 2 ranks x B/2 prompts
sample what 1 rank x B prompts sample (up to ties broken differently by rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from crisp.config import SamplingConfig

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Rollout:
    prompt_index: int  # which prompt of the call this answers
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # the response, EOS included when finish_reason == "stop"
    text: str  # decoded response without special tokens
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int | None = None
    ) -> list[Rollout]: ...


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 x in [0, 2**32), without overflowing int64."""
    return (((x >> 16) * m % 65536) * 65536 + (x & 0xFFFF) * m) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" mixer): int64 in [0, 2**32) -> int64 in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def request_keys(seed: int, prompt_indices: Sequence[int], sample_indices: Sequence[int]) -> torch.Tensor:
    """One 32-bit key per request (prompt i, sample j) of a call seeded with `seed`."""
    seed %= 2**64
    base = mix32(torch.tensor(seed & _MASK32) ^ mix32(torch.tensor(seed >> 32)))  # ()
    prompts = torch.tensor(list(prompt_indices), dtype=torch.long)  # (B,)
    samples = torch.tensor(list(sample_indices), dtype=torch.long)  # (B,)
    return mix32(mix32(base ^ prompts) ^ samples)  # (B,)


def gumbel_noise(keys: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise that depends only on (key, position, token id): (B,) keys -> (B, V)."""
    step = mix32(keys ^ mix32(torch.tensor(position, device=keys.device)))  # (B,)
    tokens = torch.arange(vocab_size, device=keys.device)  # (V,)
    bits = mix32(mix32(step[:, None] ^ tokens[None, :]) + 0x9E3779B9)  # (B, V)
    uniform = ((bits >> 8).float() + 0.5) / 2**24  # (B, V) in (0, 1)
    return -torch.log(-torch.log(uniform))  # (B, V)


class SeededSampler(LogitsProcessor):
    """Samples each row from its temperature / top-k / top-p distribution by the Gumbel-max trick with
    per-request noise, and returns scores whose argmax is the sample (so greedy decoding emits it)."""

    def __init__(self, keys: torch.Tensor, prompt_width: int, sampling: SamplingConfig):
        self.keys = keys
        self.prompt_width = prompt_width
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # (B, V)
        for warp in self.warpers:
            scores = warp(input_ids, scores)  # (B, V), -inf outside the kept set
        position = input_ids.shape[1] - self.prompt_width  # tokens generated so far, the same for every row
        noise = gumbel_noise(self.keys.to(scores.device), position, scores.shape[1])  # (B, V)
        choice = (scores + noise).argmax(dim=-1, keepdim=True)  # (B, 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, choice, 0.0)  # (B, V)


def _fsdp_types() -> tuple[type, ...]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2, torch >= 2.6
    except ImportError:
        return (FullyShardedDataParallel,)
    return (FullyShardedDataParallel, FSDPModule)


def _most_over_ranks(count: int, device: torch.device) -> int:
    total = torch.tensor(count, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total)


class HFGenerator:
    """Hugging Face `generate`: batched, left-padded, KV-cached, sampled with per-request seeds."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        first_index: int = 0,
        progress=None,
    ) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, in prompt order; `max_new_tokens` overrides the config's.

        Prompt i of this call is prompt `first_index + i` of a larger batch (a data-parallel rank's
        slice): that index, not the position in this call, keys its sampling noise and is its
        Rollout.prompt_index. Without a seed, one is drawn from torch's global generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        limit = max_new_tokens or sampling.max_new_tokens
        requests = [(first_index + i, j, list(p)) for i, p in enumerate(prompts) for j in range(sampling.n)]
        # Similar lengths together: less padding, and each batch stops when its longest one does.
        order = sorted(range(len(requests)), key=lambda r: len(requests[r][2]))
        starts = range(0, len(order), self.batch_size)
        # A sharded model runs collectives in every forward pass: every rank makes as many generate
        # calls as the busiest one (the extra ones on a placeholder) and all stop together.
        calls = _most_over_ranks(len(starts), next(self.model.parameters()).device) if self.sharded else len(starts)
        results: list[Rollout | None] = [None] * len(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            for call in range(calls):
                if call >= len(starts):
                    self._generate_batch([[self.tokenizer.eos_token_id]], torch.zeros(1, dtype=torch.long), sampling, limit)
                    continue
                chunk = [requests[r] for r in order[starts[call] : starts[call] + self.batch_size]]
                keys = request_keys(seed, [index for index, _, _ in chunk], [j for _, j, _ in chunk])  # (b,)
                outputs = self._generate_batch([prompt for _, _, prompt in chunk], keys, sampling, limit)
                for r, (index, _, prompt), rollout in zip(order[starts[call] :], chunk, outputs):
                    results[r] = Rollout(index, tuple(prompt), *rollout)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    @property
    def sharded(self) -> bool:
        """Whether FSDP splits the model's weights over several ranks."""
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and any(
            isinstance(m, _fsdp_types()) for m in self.model.modules())

    def _generate_batch(self, prompts: list[list[int]], keys: torch.Tensor, sampling: SamplingConfig, limit: int):
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, P)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        # Temperature 0 is greedy; otherwise the sampler picks each token and greedy decoding emits it.
        sampler = LogitsProcessorList([SeededSampler(keys, width, sampling)] if sampling.temperature > 0 else [])
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=limit,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=sampler,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
            synced_gpus=self.sharded,  # ranks that finish early keep running forward passes for the others
        )
        new_tokens = output[:, width:].tolist()  # (B, <= limit)
        rollouts = []
        for row in new_tokens:
            if eos in row:
                row = row[: row.index(eos) + 1]
                reason = "stop"
            else:
                reason = "length"
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            rollouts.append((tuple(row), text, reason))
        return rollouts
