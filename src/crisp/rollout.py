"""Generation backends behind one small interface.

A backend turns prompt token ids into `Rollout`s: the response token ids (EOS included when the
model stopped), the decoded text, and why it stopped. Both local backends batch prompts with left
padding and use the KV cache: `HFGenerator` through `model.generate`, `KVCacheGenerator` through a
plain loop (bench/rollout_throughput.py measures what each costs). Another backend (e.g. vLLM) only
has to implement `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from crisp.config import SamplingConfig


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


class BatchedGenerator:
    """What every local backend shares: `sampling.n` requests per prompt, sorted by prompt length and
    cut into batches of `batch_size`, run in eval mode without autograd, cut at the first EOS."""

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
        progress=None,
    ) -> list[Rollout]:
        """`sampling.n` rollouts per prompt, in prompt order; `max_new_tokens` overrides the config's."""
        if seed is not None:
            torch.manual_seed(seed)
        limit = max_new_tokens or sampling.max_new_tokens
        requests = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        # Similar lengths together: less padding, and each batch stops when its longest one does.
        order = sorted(range(len(requests)), key=lambda j: len(requests[j][1]))
        results: list[Rollout | None] = [None] * len(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                rows = self._new_tokens([requests[j][1] for j in chunk], sampling, limit)
                for j, row in zip(chunk, rows):
                    index, prompt = requests[j]
                    results[j] = Rollout(index, tuple(prompt), *self._finish(row))
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, P)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        device = next(self.model.parameters()).device
        return input_ids.to(device), attention.to(device)

    def _finish(self, row: list[int]) -> tuple[tuple[int, ...], str, str]:
        eos = self.tokenizer.eos_token_id
        if eos in row:
            row, reason = row[: row.index(eos) + 1], "stop"
        else:
            reason = "length"
        return tuple(row), self.tokenizer.decode(row, skip_special_tokens=True), reason

    def _new_tokens(self, prompts: list[list[int]], sampling: SamplingConfig, limit: int) -> list[list[int]]:
        """The tokens generated after each prompt (anything after an EOS is ignored)."""
        raise NotImplementedError


class HFGenerator(BatchedGenerator):
    """Hugging Face `generate`: batched, left-padded, KV-cached sampling."""

    def _new_tokens(self, prompts: list[list[int]], sampling: SamplingConfig, limit: int) -> list[list[int]]:
        input_ids, attention = self._left_padded(prompts)  # (B, P), (B, P)
        sample = sampling.temperature > 0
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=limit,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=sampling.top_k if sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        return output[:, input_ids.shape[1] :].tolist()  # (B, <= limit)


class KVCacheGenerator(BatchedGenerator):
    """A plain sampling loop: one prefill of the left-padded prompts, then one token per forward
    from the KV cache, until every row has sampled EOS or `limit` tokens.

    It samples exactly as `HFGenerator` does (temperature, then top-k, then top-p, then one
    multinomial draw per step from the global generator), so with the same seed both return the
    same tokens (the tests check it); it only leaves out `generate`'s general machinery. The model
    must accept `logits_to_keep` (Hugging Face causal LMs do).
    """

    def _new_tokens(self, prompts: list[list[int]], sampling: SamplingConfig, limit: int) -> list[list[int]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        input_ids, attention = self._left_padded(prompts)  # (B, P), (B, P)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # (B, P)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=input_ids.device)  # (B,)
        tokens = []
        for _ in range(limit):
            next_ids = next_token(out.logits[:, -1].float(), sampling)  # (B,)
            next_ids = next_ids.masked_fill(finished, pad)  # (B,)
            tokens.append(next_ids)
            finished |= next_ids == eos
            if finished.all() or len(tokens) == limit:
                break
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)  # (B, P + t)
            positions = positions[:, -1:] + 1  # (B, 1)
            out = self.model(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(tokens, dim=1).tolist()  # (B, <= limit)


def next_token(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(B,) next ids from (B, V) logits: argmax at temperature 0, else a draw after temperature,
    top-k (0 = off) and top-p (1 = off) filtering, in that order."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    scores = logits / sampling.temperature  # (B, V)
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = scores.sort(dim=-1)  # (B, V)
        # drop the least likely tokens whose total probability is at most 1 - top_p (never the likeliest)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - sampling.top_p  # (B, V)
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)  # (B,)
