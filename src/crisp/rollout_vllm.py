"""Rollouts on vLLM: an engine in the training process, behind crisp's `Generator` interface.

`VLLMGenerator` holds one in-process `vllm.LLM` (under `accelerate launch`, one per rank, each
generating its rank's share). crisp owns the engine's weights: the engine starts from vLLM's dummy
weights (it never reads a checkpoint from disk) and gets the student's weights from `load_weights`
(`sync_weights`, called by the training driver) at build, after every training step that
stepped the optimizer (once, however many passes the step made) and after a resume:

  - the model inside any DDP wrapper; under FSDP2 the full tensors, gathered (a collective: every
    rank syncs at the same points); FSDP1 is refused;
  - a LoRA student as merged weights, W + B @ A * scale computed out of place (the trained model's
    weights and adapters are never touched);
  - tied embeddings as the one tensor they are (vLLM ties its LM head to the embedding);
  - then the prefix cache is reset, so no KV block computed with older weights is reused.

Requests go in as token ids (the engine runs without a tokenizer; crisp's decodes), one per
(prompt, sample), each seeded with crisp's request key (`crisp.rollout.request_keys`): the same
(seed, prompt index, sample) gets the same rollout in any batch, slice, rank or rebuilt engine.
The engine adds nothing of the checkpoint's generation config (`generation_config="vllm"`): the
stop token is crisp's EOS, the length cap crisp's `max_new_tokens`. Building the engine restores the
global python/numpy/torch RNG states and torch's thread settings that vLLM changes.

The engine samples with its own kernels and its own seeded generator, so its rollouts are not the
HF backend's for the same seed (greedy decoding agrees, up to floating-point ties).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import tempfile
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from crisp.config import VLLM_INSTALL, ConfigError, SamplingConfig, VLLMSettings
from crisp.modeling import is_peft, unwrap
from crisp.rollout import HFGenerator, Rollout, expand_requests, finished_rollout, request_keys

CPU_KV_CACHE_GIB = 1.0


def import_vllm():
    """vllm, imported with the engine in this process (no engine subprocess), or a ConfigError
    naming the install command."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            f"backend: vllm: the vLLM engine cannot be imported ({error}); install it with {VLLM_INSTALL}"
        ) from error
    return vllm


@contextlib.contextmanager
def kept_global_state():
    """Restore python's, numpy's and torch's global RNGs and torch's thread count and
    `set_num_threads` (vLLM's CPU worker reseeds the former and disables the latter)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def release_engine(core) -> None:
    """vLLM's EngineCore.shutdown without its last step, the end of torch.distributed: the process
    group belongs to the run (accelerate's, under `accelerate launch`) and vLLM's own groups stay for
    the next engine of this process. Also undoes the engine's gc.freeze(), so its memory is freed."""
    core.structured_output_manager.clear_backend()
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    gc.unfreeze()


def reset_stale_engine_groups() -> None:
    """Forget vLLM's process groups when the process group they were built on has ended (e.g. by
    crisp.distributed.end_processes after an earlier command in this process): the next engine
    builds them again."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD is not None and not torch.distributed.is_initialized():
        for name in (
            "_TP",
            "_ETP",
            "_ENGRAM_DP",
            "_DCP",
            "_PCP",
            "_PP",
            "_DP",
            "_EP",
            "_EPLB",
            "_WORLD",
            "_INNER_DP_WORLD",
            "_NODE_COUNT",
        ):
            if hasattr(parallel_state, name):
                setattr(parallel_state, name, None)


def engine_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the engine runs, by Hugging Face name, from the (possibly wrapped) student."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = unwrap(model)
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "rollout.backend: vllm under FSDP needs FSDP2 (fsdp_version: 2 in the accelerate config), "
            "whose full weights crisp gathers for the engine"
        )
    if is_peft(model):
        return merged_lora_weights(model)
    from crisp.distributed import full_state_dict

    return {name: tensor.detach() for name, tensor in full_state_dict(model).items()}


def merged_lora_weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights with the "default" adapter merged in, as new tensors: every LoRA
    layer's weight is base + delta, computed out of place; the adapters (the teacher's too) and the
    base weights stay as they are."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    weights = {
        key.replace(".base_layer.", "."): value.detach()
        for key, value in base.state_dict().items()
        if "lora_" not in key
    }
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = f"{name}.weight"
            weights[key] = weights[key] + module.get_delta_weight("default").detach().to(weights[key].dtype)
    return weights


class VLLMGenerator:
    """A vLLM engine for one model; `generate` as the other backends, `load_weights` to sync."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        settings: VLLMSettings,
        *,
        trust_remote_code: bool = False,
        max_new_tokens: int = 0,
    ):
        """Build the engine for `model`'s architecture and load its weights. `max_new_tokens`: the
        longest response the run will ask for (checked against max_model_len before any compute)."""
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.settings = settings
        self.on_gpu = torch.cuda.is_available()
        inner = unwrap(model)
        causal_lm = inner.get_base_model() if is_peft(inner) else inner
        config = copy.deepcopy(causal_lm.config)
        config.architectures = [type(causal_lm).__name__]  # which vLLM model class runs it
        self.max_model_len = settings.max_model_len or config.max_position_embeddings
        if self.max_model_len <= max_new_tokens:
            raise ConfigError(
                f"vllm.max_model_len ({self.max_model_len}) must exceed the prompt plus max_new_tokens "
                f"({max_new_tokens})"
            )
        if settings.enable_sleep_mode and not self.on_gpu:
            raise ConfigError("vllm.enable_sleep_mode: sleep mode needs a GPU (vLLM's CPU backend ignores it)")
        self.chunked_prefill = (
            settings.enable_chunked_prefill
            if settings.enable_chunked_prefill is not None
            else (None if self.on_gpu else False)
        )
        if not self.on_gpu and self.chunked_prefill and settings.max_num_batched_tokens is None:
            raise ConfigError(
                "vllm.enable_chunked_prefill: on CPU, seeded sampling fails on a split prefill; "
                "set vllm.max_num_batched_tokens above every call's prompt tokens, or leave "
                "enable_chunked_prefill unset (off on CPU)"
            )
        dtype = (
            settings.dtype if settings.dtype != "auto" else str(next(inner.parameters()).dtype).removeprefix("torch.")
        )
        kv_gib = settings.kv_cache_gib or (None if self.on_gpu else CPU_KV_CACHE_GIB)
        options = dict(
            load_format="dummy",  # crisp pushes the weights; the engine never loads any of its own
            skip_tokenizer_init=True,  # token ids in and out; crisp's tokenizer decodes
            generation_config="vllm",  # nothing from the checkpoint's generation config (EOS ids, length caps)
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib else None,
            enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not self.on_gpu,
            enable_sleep_mode=settings.enable_sleep_mode,
            enable_prefix_caching=True,
            seed=0,
            runner="generate",
        )
        for key in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(settings, key) is not None:
                options[key] = getattr(settings, key)
        if self.chunked_prefill is not None:
            options["enable_chunked_prefill"] = self.chunked_prefill
            if not self.chunked_prefill and settings.max_num_batched_tokens is None:
                options["max_num_batched_tokens"] = max(self.max_model_len, 8192)  # whole prompts per step
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            options["distributed_executor_backend"] = "external_launcher"  # one engine per rank, ranks independent
        self.max_num_batched_tokens = options.get("max_num_batched_tokens")
        with tempfile.TemporaryDirectory() as directory, kept_global_state():
            reset_stale_engine_groups()
            config.save_pretrained(directory)  # the architecture only: no weights, no generation config
            self.llm = vllm.LLM(model=directory, **options)
        client = self.llm.llm_engine.engine_core  # the in-process engine core's client
        client._finalizer.detach()  # its shutdown ends torch.distributed, whose process group is the run's
        self._finalizer = weakref.finalize(self, release_engine, client.engine_core)
        self.asleep = False
        self.load_weights(model)

    def close(self) -> None:
        """Free the engine now (as dropping the last reference to the generator does)."""
        self._finalizer()
        self.llm = None

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Replace the engine's weights with the model's (see the module docstring), in place."""
        weights = engine_weights(model)
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()

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
        """`sampling.n` rollouts per prompt, in prompt order (as crisp.rollout.BatchedGenerator.generate)."""
        return self._run(prompts, sampling, seed, max_new_tokens, first_index, progress, logprobs=False)[0]

    def generate_with_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        first_index: int = 0,
        progress=None,
    ) -> tuple[list[Rollout], list[list[float]]]:
        """The rollouts and, for each, the engine's log-probability of every sampled token (of the
        model's raw distribution, before temperature, top-k and top-p)."""
        return self._run(prompts, sampling, seed, max_new_tokens, first_index, progress, logprobs=True)

    def _run(
        self, prompts, sampling: SamplingConfig, seed, max_new_tokens, first_index: int, progress, *, logprobs: bool
    ) -> tuple[list[Rollout], list[list[float]] | None]:
        from vllm import SamplingParams

        seed, limit, requests = expand_requests(prompts, sampling, seed, max_new_tokens, first_index)
        self._check(requests, limit, seeded=sampling.temperature > 0)
        keys = request_keys(seed, [index for index, _, _ in requests], [j for _, j, _ in requests]).tolist()
        eos = self.tokenizer.eos_token_id
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=limit,
                seed=key if sampling.temperature > 0 else None,
                stop_token_ids=[eos],
                detokenize=False,
                logprobs=0 if logprobs else None,
            )
            for key in keys
        ]
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        with kept_global_state():
            outputs = self.llm.generate(
                [{"prompt_token_ids": prompt} for _, _, prompt in requests], params, use_tqdm=False
            )
        if self.settings.enable_sleep_mode:  # level 1: the weights go to host memory, the KV cache is freed
            self.llm.sleep(level=1)
            self.asleep = True
        rollouts, values = [], []
        for (index, _, prompt), output in zip(requests, outputs):
            completion = output.outputs[0]
            rollouts.append(finished_rollout(index, prompt, completion.token_ids, self.tokenizer))  # ends at its EOS
            if logprobs:
                values.append([step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
        if progress is not None:
            progress.update(len(requests))
        return rollouts, values if logprobs else None

    def _check(self, requests, limit: int, *, seeded: bool) -> None:
        """Bad lengths are errors naming the key, before the engine computes anything."""
        longest = max((len(prompt) for _, _, prompt in requests), default=0)
        if longest + limit > self.max_model_len:
            raise ConfigError(
                f"vllm.max_model_len ({self.max_model_len}) is below a prompt of {longest} tokens "
                f"plus max_new_tokens ({limit}); raise vllm.max_model_len"
            )
        total = sum(len(prompt) for _, _, prompt in requests)
        if seeded and not self.on_gpu and self.chunked_prefill and total > self.max_num_batched_tokens:
            raise ConfigError(
                f"vllm.max_num_batched_tokens ({self.max_num_batched_tokens}) is below this call's "
                f"{total} prompt tokens: on CPU, vLLM would split a prefill, which its seeded sampler "
                "cannot do; raise it or leave vllm.enable_chunked_prefill unset (off on CPU)"
            )


def build_generator(
    backend: str,
    settings: VLLMSettings,
    model: torch.nn.Module,
    tokenizer,
    *,
    batch_size: int = 256,
    trust_remote_code: bool = False,
    max_new_tokens: int = 0,
):
    """The generator that `backend` names: HFGenerator (batch_size sequences per generate call) or a
    VLLMGenerator with `settings` and the model's weights loaded."""
    if backend == "vllm":
        return VLLMGenerator(
            model, tokenizer, settings, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens
        )
    return HFGenerator(model, tokenizer, batch_size=batch_size)


def sync_weights(generator, model: torch.nn.Module) -> None:
    """After the model's weights changed (an optimizer step, a resume): give them to the engine.
    Generators that run the model itself need nothing."""
    if isinstance(generator, VLLMGenerator):
        generator.load_weights(model)
