"""Generation backends behind one small interface.

A backend turns prompt token ids into `Rollout`s: the response token ids (EOS included when the
model stopped), the decoded text, and why it stopped. The HF backend batches prompts with left
padding and uses the KV cache; another backend (e.g. vLLM) only has to implement `generate`.
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


class HFGenerator:
    """Hugging Face `generate`: batched, left-padded, KV-cached sampling."""

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
                outputs = self._generate_batch([requests[j][1] for j in chunk], sampling, limit)
                for j, rollout in zip(chunk, outputs):
                    index, prompt = requests[j]
                    results[j] = Rollout(index, tuple(prompt), *rollout)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig, limit: int):
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, P)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        sample = sampling.temperature > 0
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=limit,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=sampling.top_k if sample else None,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
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
