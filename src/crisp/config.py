"""Run configurations: strict pydantic models, loaded from YAML with `key=value` overrides.

This module holds the sections every run shares; each method's own config (a `RunConfig` with its
`method` literal) lives with the method, in crisp.methods. Every training config shares `method`,
`output_dir`, `max_steps`, `seed`, `resume` and the sections below; an unknown
key, a wrong type or an out-of-range value is a `ConfigError` that names the key, raised before any
model is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from crisp.anatomy import DEFAULT_MARKERS, LOOP_NGRAM, LOOP_REPEATS
from crisp.tracking import PIP_PACKAGES

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the offending key."""


def _known_trackers(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in PIP_PACKAGES]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; one of {', '.join(PIP_PACKAGES)}")
    return list(dict.fromkeys(names))


# experiment trackers the run's metrics also go to (crisp.tracking); metrics.jsonl is written either way
Trackers = Annotated[list[str], AfterValidator(_known_trackers)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelSpec(Strict):
    """Build a randomly initialised model from scratch (the built-in demo)."""

    architecture: Literal["llama", "qwen2", "qwen3"] = "llama"
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 512
    max_positions: PositiveInt = 512


class LoraSpec(Strict):
    """LoRA adapters (peft) on the model's linear layers; only the adapters train.

    The LM head and the embeddings stay outside LoRA: a self-distillation teacher that is another
    adapter on the same base model shares them with the student.
    """

    r: PositiveInt = 64
    alpha: PositiveFloat = 128
    dropout: Probability = 0.0
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _not_head_or_embeddings(cls, modules):
        shared = [m for m in modules if "lm_head" in m or "embed" in m] if isinstance(modules, list) else []
        if shared:
            raise ValueError(
                f"{', '.join(shared)}: the LM head and embeddings stay outside LoRA "
                "(the teacher adapter shares them with the student)"
            )
        return modules


class ModelConfig(Strict):
    path: str | None = None  # a local HF directory or a hub id
    tiny: TinyModelSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # how the weights are stored
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30% more time
    lora: LoraSpec | None = None  # train LoRA adapters instead of every weight

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path (an existing model) or model.tiny (build one)")
        return self


class PromptConfig(Strict):
    template: str = "dapo"  # a preset (dapo, plain) or a custom string containing {question}
    system: str | None = None
    enable_thinking: bool | None = None
    # TFPI's thinking-free mode: every prompt (student and teacher) ends with an empty closed
    # thinking block, "<think>\n\n</think>\n\n" (see crisp.prompts)
    thinking_free: bool = False


class SamplingConfig(Strict):
    n: PositiveInt = 1
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0 = off
    max_new_tokens: PositiveInt = 8192


# The papers' evaluation sampler: the default of EvalConfig.sampling, EvalRunConfig.sampling and
# `crisp eval`'s flags (a sampling section given in a config replaces it whole).
EVAL_SAMPLING = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=30_000)


VLLM_INSTALL = "pip install -e '.[vllm]' on a GPU machine, `make setup-vllm` on CPU"


def vllm_installed() -> bool:
    """Whether the vLLM engine is importable by name (crisp imports it only when a run uses it)."""
    return importlib.util.find_spec("vllm") is not None


def require_engine(backend: str) -> None:
    """backend: vllm is an error naming the install command when the engine is not installed."""
    if backend == "vllm" and not vllm_installed():
        raise ValueError(f"backend: vllm needs the vLLM engine, which is not installed ({VLLM_INSTALL})")


class VLLMSettings(Strict):
    """The colocated vLLM engine (`backend: vllm`); every default works on CPU and on a GPU."""

    max_model_len: PositiveInt | None = None  # prompt + response tokens per request; None: the model's positions
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.3  # GPU share for the engine (training shares it)
    kv_cache_gib: PositiveFloat | None = None  # KV cache size; None: 1 GiB on CPU, gpu_memory_utilization on a GPU
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the trained weights' dtype
    enable_sleep_mode: bool = False  # GPU only: offload the engine's weights and free its KV cache while training
    # None: off on CPU (vLLM's CPU sampler cannot seed a split prefill), vLLM's default on a GPU
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: PositiveInt | None = None  # tokens per engine step; None: vLLM's default
    max_num_seqs: PositiveInt | None = None  # sequences per engine step; None: vLLM's default


class RolloutConfig(SamplingConfig):
    """The training rollouts' sampler and the backend that runs it."""

    backend: Literal["hf", "vllm"] = "hf"  # hf: Hugging Face generate; vllm: a vLLM engine in this process
    vllm: VLLMSettings = VLLMSettings()

    @model_validator(mode="after")
    def _engine_installed(self) -> RolloutConfig:
        require_engine(self.backend)
        return self


def check_engine_lengths(backend: str, settings: VLLMSettings, lengths: dict[str, int], *, prefix: str = "") -> None:
    """A vLLM engine's max_model_len must hold every response it generates: `lengths` maps a config key
    to a max_new_tokens (the prompt lengths are checked when the engine generates)."""
    if backend != "vllm" or settings.max_model_len is None:
        return
    for key, max_new_tokens in lengths.items():
        if settings.max_model_len <= max_new_tokens:
            raise ValueError(
                f"{prefix}vllm.max_model_len ({settings.max_model_len}) must exceed the prompt plus {key} "
                f"({max_new_tokens})"
            )


def training_engine_lengths(cfg: RunConfig) -> None:
    """The rollouts, and the evaluations that run on the same engine during training (`cfg`: a
    method's config with a `rollout` section)."""
    lengths = {"rollout.max_new_tokens": cfg.rollout.max_new_tokens}
    if cfg.eval is not None:
        lengths["eval.sampling.max_new_tokens"] = cfg.eval.sampling.max_new_tokens
    check_engine_lengths(cfg.rollout.backend, cfg.rollout.vllm, lengths, prefix="rollout.")


class OptimConfig(Strict):
    lr: PositiveFloat = 1e-6
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: PositiveFloat | None = 1.0


class DataConfig(Strict):
    """Training problems: the built-in synthetic task, or a problem file / benchmark name."""

    source: str = "synthetic"
    size: PositiveInt = 20_000  # synthetic problems to draw
    levels: list[PositiveInt] = [1, 2, 3, 4]
    limit: PositiveInt | None = None


class EvalConfig(Strict):
    benchmark: str = "synthetic"
    every: Annotated[int, Field(ge=0)] = 0  # optimizer steps between evaluations; 0 = only at the end
    k: PositiveInt = 1
    limit: PositiveInt | None = None
    batch_size: PositiveInt = 256
    sampling: SamplingConfig = EVAL_SAMPLING


class RunConfig(Strict):
    method: str
    output_dir: str
    max_steps: Annotated[int, Field(ge=0)]
    seed: int = 0
    resume: str = "none"  # none | auto | a checkpoint directory
    model: ModelConfig
    prompt: PromptConfig = PromptConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig | None = None
    log_every: PositiveInt = 10
    # CPU threads for torch (None: torch's default). Results depend on the thread count through
    # floating-point summation order, so a fixed count makes a CPU run reproducible.
    threads: PositiveInt | None = None
    save_every: Annotated[int, Field(ge=0)] = 0  # 0 = only the final model
    keep_checkpoints: PositiveInt = 2
    # "bf16": every forward pass (training, teacher, generation) runs under bf16 autocast; the
    # weights keep model.dtype (float32 weights + bf16 compute is the usual full fine-tuning setup).
    mixed_precision: Literal["no", "bf16"] = "no"
    report_to: Trackers = []
    max_skipped_steps: PositiveInt = 10  # stop after this many consecutive non-finite steps

    @property
    def optimizer_steps(self) -> int:
        """The optimizer steps of the whole run (the LR schedule's length)."""
        return self.max_steps

    @property
    def uses_checkpoints(self) -> bool:
        """Whether the run saves checkpoints or resumes from one."""
        return bool(self.save_every) or self.resume != "none"


class AnatomyConfig(Strict):
    """What `crisp eval` counts in each response (the rules are in crisp.anatomy's docstring)."""

    markers: list[str] = list(DEFAULT_MARKERS)  # phrases, case-insensitive, whole words
    loop_ngram: PositiveInt = LOOP_NGRAM  # a repetition loop: a span of this many words ...
    loop_repeats: Annotated[int, Field(ge=2)] = LOOP_REPEATS  # ... occurring at least this many times

    @field_validator("markers")
    @classmethod
    def _distinct_phrases(cls, markers: list[str]) -> list[str]:
        markers = [" ".join(m.split()) for m in markers]
        if not all(markers):
            raise ValueError("a marker must have at least one word")
        repeated = sorted({m for m in markers if [n.lower() for n in markers].count(m.lower()) > 1})
        if repeated:
            raise ValueError(f"listed twice (markers are case-insensitive): {', '.join(repeated)}")
        return markers


class EvalModelConfig(Strict):
    path: str  # a local HF directory or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class EvalRunConfig(Strict):
    """`crisp eval --config FILE`: one model, several benchmarks, one protocol. Each benchmark's
    samples.jsonl and summary.json go to output_dir/<benchmark name>/."""

    model: EvalModelConfig
    benchmarks: Annotated[list[str], Field(min_length=1)]  # names (math500, aime24, ...) or files
    output_dir: str
    k: PositiveInt = 8  # samples per problem: accuracy is mean@k
    sampling: SamplingConfig = EVAL_SAMPLING
    prompt: PromptConfig = PromptConfig()
    instruction: str | None = None  # prepend an instruction preset or text (the prompt-only baseline)
    grader: Literal["exact", "math-verify"] | None = None  # None: exact for synthetic, else math-verify
    limit: PositiveInt | None = None  # only the first N problems of each benchmark
    seed: int = 0
    batch_size: PositiveInt = 256  # sequences per generate call
    backend: Literal["hf", "vllm"] = "hf"  # as rollout.backend in training
    vllm: VLLMSettings = VLLMSettings()
    baseline: str | None = None  # the output_dir of an earlier `crisp eval --config`: adds compression ratios
    mixed_precision: Literal["no", "bf16"] = "no"
    anatomy: AnatomyConfig = AnatomyConfig()
    report_to: Trackers = []  # the trackers' files go to output_dir/trackers

    # Evaluate in each of these prompt modes, into output_dir/<benchmark>/<mode>/ (TFPI's two modes:
    # the plain template, and thinking-free prompts); empty: the one mode `prompt` sets, no subfolder.
    modes: list[Literal["thinking", "thinking_free"]] = []

    @model_validator(mode="after")
    def _one_way_to_set_the_mode(self) -> EvalRunConfig:
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes: each mode once (got {self.modes})")
        if self.modes and self.prompt.thinking_free:
            raise ValueError("modes: set modes or prompt.thinking_free, not both")
        if self.modes and self.prompt.enable_thinking is False:  # its "thinking" mode would not think
            raise ValueError("modes: prompt.enable_thinking: false would make every mode thinking-free")
        return self

    @model_validator(mode="after")
    def _engine_fits(self) -> EvalRunConfig:
        require_engine(self.backend)
        check_engine_lengths(self.backend, self.vllm, {"sampling.max_new_tokens": self.sampling.max_new_tokens})
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def set_path(data: dict, path: list[str], value) -> None:
    """data[path[0]][path[1]]... = value, creating missing sections."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        set_path(data, *parse_override(item))
    return data


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        message = e["msg"].removeprefix("Value error, ")
        if message.split(":")[0].split(" (")[0].startswith(loc or "\0"):  # a check that names its own key
            lines.append(message)
        else:
            lines.append(f"{loc or '(top level)'}: {message}")
    return "; ".join(lines)


def validate(data: dict, model: type[BaseModel] | None = None):
    """Validate a config dict; the method's config (crisp.methods) is the model unless one is given."""
    if model is None:
        from crisp.methods import config_classes

        classes = config_classes()
        if data.get("method") not in classes:
            raise ConfigError(f"method: must be one of {', '.join(classes)} (got {data.get('method')!r})")
        model = classes[data["method"]]
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model: type[BaseModel] | None = None):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return validate(apply_overrides(data, overrides or []), model)


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
