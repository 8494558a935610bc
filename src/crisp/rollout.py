"""Generation backends behind one small interface.

A backend turns prompt token ids into `Rollout`s: the response token ids (EOS included when the
model stopped), the decoded text, and why it stopped. Both local backends batch prompts with left
padding and use the KV cache: `HFGenerator` through `model.generate`, `KVCacheGenerator` through a
plain loop (bench/rollout_throughput.py measures what each costs). Another backend (e.g. vLLM) only
has to implement `generate`.

Sampling is seeded per request, not per call: sample j of prompt i draws its noise from
(seed, first_index + i, j, position) alone. The same prompt therefore gets the same rollout
whichever batch, generation chunk, data-parallel rank or local backend it lands in, so 2 ranks x B/2
prompts sample what 1 rank x B prompts sample (up to ties broken differently by rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from crisp.config import SamplingConfig
from crisp.modeling import eval_mode, left_padded

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
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        first_index: int = 0,
        progress=None,
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


def rollout_seed(run_seed: int, step: int, sampling_round: int | None = None) -> int:
    """The generation seed of training step `step` (0-based) of a run seeded with `run_seed`; a
    method that samples in several rounds per step (GRPO's dynamic sampling) has 1,000 seeds a step."""
    base = run_seed * 1_000_003
    return base + step if sampling_round is None else base + step * 1_000 + sampling_round


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
        position = input_ids.shape[1] - self.prompt_width  # tokens generated so far, the same for every row
        choice = self.pick(scores, position)[:, None]  # (B, 1)
        return torch.full_like(scores, -float("inf"), dtype=torch.float).scatter_(1, choice, 0.0)  # (B, V)

    def pick(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """(B,) token ids sampled from (B, V) next-token logits at generated position `position`."""
        scores = scores.float()  # (B, V)
        for warp in self.warpers:
            scores = warp(None, scores)  # (B, V), -inf outside the kept set; the warpers ignore input_ids
        noise = gumbel_noise(self.keys.to(scores.device), position, scores.shape[1])  # (B, V)
        return (scores + noise).argmax(dim=-1)  # (B,)


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


def expand_requests(
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seed: int | None,
    max_new_tokens: int | None,
    first_index: int,
) -> tuple[int, int, list[tuple[int, int, list[int]]]]:
    """What a generate call samples: its seed (drawn from torch's global generator when None), its
    token limit (`max_new_tokens` over the config's), and one request (prompt index in the larger
    batch, sample index, prompt ids) per rollout, `sampling.n` per prompt in prompt order."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    limit = max_new_tokens or sampling.max_new_tokens
    return seed, limit, [(first_index + i, j, list(p)) for i, p in enumerate(prompts) for j in range(sampling.n)]


def finished_rollout(index: int, prompt: Sequence[int], row: Sequence[int], tokenizer) -> Rollout:
    """A generated row as a Rollout: cut after its first EOS ("stop"), or as it is ("length")."""
    row = list(row)
    if tokenizer.eos_token_id in row:
        row, reason = row[: row.index(tokenizer.eos_token_id) + 1], "stop"
    else:
        reason = "length"
    return Rollout(index, tuple(prompt), tuple(row), tokenizer.decode(row, skip_special_tokens=True), reason)


class BatchedGenerator:
    """What every local backend shares: `sampling.n` requests per prompt, each with its own sampling
    key, sorted by prompt length and cut into batches of `batch_size`, run in eval mode without
    autograd, cut at the first EOS. A backend implements `_new_tokens` for one left-padded batch."""

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
        seed, limit, requests = expand_requests(prompts, sampling, seed, max_new_tokens, first_index)
        # Similar lengths together: less padding, and each batch stops when its longest one does.
        order = sorted(range(len(requests)), key=lambda r: len(requests[r][2]))
        starts = range(0, len(order), self.batch_size)
        # A sharded model runs collectives in every forward pass: every rank makes as many generate
        # calls as the busiest one (the extra ones on a placeholder) and all stop together.
        calls = _most_over_ranks(len(starts), next(self.model.parameters()).device) if self.sharded else len(starts)
        results: list[Rollout | None] = [None] * len(requests)
        with eval_mode(self.model):
            for call in range(calls):
                if call >= len(starts):
                    self._new_tokens([[self.tokenizer.eos_token_id]], torch.zeros(1, dtype=torch.long), sampling, limit)
                    continue
                chunk = [requests[r] for r in order[starts[call] : starts[call] + self.batch_size]]
                keys = request_keys(seed, [index for index, _, _ in chunk], [j for _, j, _ in chunk])  # (b,)
                rows = self._new_tokens([prompt for _, _, prompt in chunk], keys, sampling, limit)
                for r, (index, _, prompt), row in zip(order[starts[call] :], chunk, rows):
                    results[r] = finished_rollout(index, prompt, row, self.tokenizer)
                if progress is not None:
                    progress.update(len(chunk))
        return results  # type: ignore[return-value]

    @property
    def sharded(self) -> bool:
        """Whether FSDP splits the model's weights over several ranks."""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return False
        types = _fsdp_types()
        return any(isinstance(m, types) for m in self.model.modules())

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention = left_padded(prompts, self.tokenizer.pad_token_id)  # (B, P), (B, P)
        device = next(self.model.parameters()).device
        return input_ids.to(device), attention.to(device)

    def _new_tokens(
        self, prompts: list[list[int]], keys: torch.Tensor, sampling: SamplingConfig, limit: int
    ) -> list[list[int]]:
        """The tokens generated after each prompt, row i sampled with keys[i] (anything after an EOS
        is ignored)."""
        raise NotImplementedError


class HFGenerator(BatchedGenerator):
    """Hugging Face `generate`: batched, left-padded, KV-cached, sampled with per-request seeds."""

    def _new_tokens(
        self, prompts: list[list[int]], keys: torch.Tensor, sampling: SamplingConfig, limit: int
    ) -> list[list[int]]:
        input_ids, attention = self._left_padded(prompts)  # (B, P), (B, P)
        # Temperature 0 is greedy; otherwise the sampler picks each token and greedy decoding emits it.
        sampler = [SeededSampler(keys, input_ids.shape[1], sampling)] if sampling.temperature > 0 else []
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=limit,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList(sampler),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
            synced_gpus=self.sharded,  # ranks that finish early keep running forward passes for the others
        )
        return output[:, input_ids.shape[1] :].tolist()  # (B, <= limit)


class KVCacheGenerator(BatchedGenerator):
    """A plain sampling loop: one prefill of the left-padded prompts, then one token per forward
    from the KV cache, until every row has sampled EOS or `limit` tokens.

    It picks each token with the same per-request `SeededSampler` as `HFGenerator` (argmax at
    temperature 0), so with the same seed both return the same tokens (the tests check it); it only
    leaves out `generate`'s general machinery. The model must accept `logits_to_keep` (Hugging Face
    causal LMs do). Under FSDP it runs all `limit` steps, so every rank makes the same forwards.
    """

    def _new_tokens(
        self, prompts: list[list[int]], keys: torch.Tensor, sampling: SamplingConfig, limit: int
    ) -> list[list[int]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        input_ids, attention = self._left_padded(prompts)  # (B, P), (B, P)
        sampler = SeededSampler(keys, input_ids.shape[1], sampling) if sampling.temperature > 0 else None
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # (B, P)
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=input_ids.device)  # (B,)
        stop_early = not self.sharded  # a sharded model's ranks must keep making forwards together
        tokens = []
        for position in range(limit):
            logits = out.logits[:, -1]  # (B, V)
            next_ids = logits.argmax(dim=-1) if sampler is None else sampler.pick(logits, position)  # (B,)
            next_ids = next_ids.masked_fill(finished, pad)  # (B,)
            tokens.append(next_ids)
            finished |= next_ids == eos
            if (stop_early and finished.all()) or len(tokens) == limit:
                break
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)  # (B, P + t)
            positions = positions[:, -1:] + 1  # (B, 1)
            out = self.model(
                input_ids=next_ids[:, None],
                attention_mask=attention,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return torch.stack(tokens, dim=1).tolist()  # (B, <= limit)
