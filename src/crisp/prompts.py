"""Student and teacher prompts, applied through the tokenizer's chat template.

The student sees the task prompt. A CRISP teacher sees the same prompt with a "be concise"
instruction in front of it; an OPSD teacher sees the question with a privileged reference solution.
Both sides go through the same chat template with the same `enable_thinking` and `thinking_free`,
so nothing differs between them but the text that is meant to differ.

Thinking-free mode (TFPI's "ThinkFree" prompt): the rendered chat prompt, generation prompt
included, then exactly an empty closed thinking block, `<think>\n\n</think>\n\n`, so the model
answers with its thinking already over. For Qwen3 this is the text its template writes with
`enable_thinking=False`. A template whose generation prompt already opens `<think>` (DeepSeek-R1-
Distill's ends `<think>\n`) gets that block closed, not a second one opened. The appended text is
prompt: it is in the prompt ids, never in a response, a loss mask or a token count.
"""

from __future__ import annotations

from dataclasses import dataclass

from crisp.anatomy import THINK_CLOSE, THINK_OPEN
from crisp.config import ConfigError
from crisp.data.problems import Problem

STUDENT_TEMPLATES = {
    # DAPO-style prompt used by CRISP for real models.
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
        '\n\n{question}\n\nRemember to put your answer on its own line after "Answer:".'
    ),
    # The bare question (the built-in synthetic task states its own answer format).
    "plain": "{question}",
}

INSTRUCTIONS = {
    "v1": (
        "Solve the following math problem concisely and correctly. Be direct \u2014 avoid unnecessary "
        "elaboration, redundant steps, or restating the problem. Focus only on the key reasoning steps "
        "needed to reach the answer."
    ),
    "v2": (
        "Solve the following math problem concisely and correctly. Prioritize a correct final answer "
        "above brevity. For straightforward problems, be direct: avoid unnecessary elaboration, "
        "redundant steps, or restating the problem. For difficult or multi-step problems, do NOT "
        "over-compress: keep every reasoning step needed for correctness, including case analysis, "
        "edge cases, and a brief check of the final answer. Never omit a step that the answer depends on."
    ),
    "percent": "Solve the following math problem using {percent}% fewer tokens than you normally would.",
    "word_limit": "Solve the following math problem in at most {words} words.",
}


def prompt_texts() -> list[str]:
    """Every fixed text a prompt can hold (instruction presets, student templates, the reference
    template): what a tiny word-level tokenizer must cover besides the task's own texts."""
    return list(INSTRUCTIONS.values()) + list(STUDENT_TEMPLATES.values()) + [REFERENCE_TEMPLATE]


CLOSED_THINKING = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"  # what a thinking-free prompt ends with


def has_thinking_convention(chat_template) -> bool:
    """Whether a chat template (its source, or a dict of named sources) knows thinking sections."""
    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template or ""]
    return any(THINK_OPEN in source or THINK_CLOSE in source for source in sources)


def close_thinking(rendered: str) -> str:
    """`rendered`, a chat prompt with its generation prompt, ending with an empty closed thinking block."""
    if rendered.endswith(CLOSED_THINKING):  # e.g. Qwen3 rendered with enable_thinking=False
        return rendered
    before = rendered.rstrip("\n")
    if before.endswith(THINK_OPEN):  # the generation prompt opened the block itself (R1-Distill)
        return before[: -len(THINK_OPEN)] + CLOSED_THINKING
    return rendered + CLOSED_THINKING


REFERENCE_TEMPLATE = (
    "{question}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate "
    "your own step-by-step reasoning that derives the same final answer to the problem below:\n{question}"
)


def resolve_instruction(spec: str | None, *, percent: int = 50, words: int = 100) -> str | None:
    """A preset name (v1, v2, percent, word_limit) or, for anything else, the custom text itself."""
    if spec is None or spec == "":
        return None
    text = INSTRUCTIONS.get(spec, spec)
    return text.format(percent=percent, words=words) if spec in ("percent", "word_limit") else text


@dataclass(frozen=True)
class PromptBuilder:
    """Turns a Problem into chat-templated token ids for the student or the teacher.

    `template` is a STUDENT_TEMPLATES key or a custom string containing "{question}".
    """

    tokenizer: object
    template: str = "dapo"
    system: str | None = None
    enable_thinking: bool | None = None
    thinking_free: bool = False  # end every prompt with an empty closed thinking block (TFPI)

    @classmethod
    def from_config(cls, tokenizer, prompt) -> PromptBuilder:
        """The builder a run's `prompt:` config section describes."""
        return cls(
            tokenizer,
            template=prompt.template,
            system=prompt.system,
            enable_thinking=prompt.enable_thinking,
            thinking_free=prompt.thinking_free,
        )

    @property
    def thinking_mode(self) -> str:
        """How the prompts leave the model to answer: "thinking_free" (its thinking section already
        closed) or "thinking" (the template's default)."""
        return "thinking_free" if self.thinking_free or self.enable_thinking is False else "thinking"

    def student_text(self, problem: Problem) -> str:
        template = STUDENT_TEMPLATES.get(self.template, self.template)
        if "{question}" not in template:
            raise ValueError(f"prompt template must contain '{{question}}': {template!r}")
        return template.replace("{question}", problem.question)

    def teacher_text(self, problem: Problem, *, instruction: str | None, reference: bool) -> str:
        text = self.student_text(problem)
        if reference:
            if not problem.solution:
                raise ValueError(f"problem {problem.id} has no reference solution for an OPSD teacher")
            text = REFERENCE_TEMPLATE.format(question=text, solution=problem.solution)
        if instruction:
            text = f"{instruction}\n\n{text}"
        return text

    def render(self, user_text: str) -> str:
        messages = [{"role": "user", "content": user_text}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        if self.thinking_free and not has_thinking_convention(self.tokenizer.chat_template):
            name = getattr(self.tokenizer, "name_or_path", "") or "this tokenizer"
            raise ConfigError(
                f"prompt.thinking_free: the chat template of {name} has no thinking convention (it "
                f"never mentions {THINK_OPEN} or {THINK_CLOSE}), so there is no thinking to close"
            )
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        return close_thinking(text) if self.thinking_free else text

    def encode(self, user_text: str) -> list[int]:
        return self.tokenizer(self.render(user_text), add_special_tokens=False)["input_ids"]

    def student_ids(self, problem: Problem) -> list[int]:
        return self.encode(self.student_text(problem))

    def teacher_ids(self, problem: Problem, *, instruction: str | None, reference: bool = False) -> list[int]:
        return self.encode(self.teacher_text(problem, instruction=instruction, reference=reference))
