"""The training methods, one module each: its config (a crisp.config.RunConfig whose `method`
literal names it), its step, and a crisp.driver.Method subclass that builds what it trains. Each
module ends with `CONFIG, METHOD = ...`; a new method is one new module here, found by name (a
module whose name starts with _ is a helper, not a method).

- sft: supervised fine-tuning (the demo's base model, SFT baselines)
- selfdistill: CRISP and OPSD (a teacher that is the model itself with more context)
- grpo: SIRI and TFPI (GRPO with DAPO's changes and a length schedule)
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType


@cache
def _modules() -> dict[str, ModuleType]:
    modules = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):  # a helper shared by methods, not a method
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not hasattr(module, "CONFIG") or not hasattr(module, "METHOD"):
            raise ImportError(f"{module.__name__} is in crisp.methods but does not end with `CONFIG, METHOD = ...`")
        modules[module.CONFIG.model_fields["method"].default] = module
    return modules


def config_classes() -> dict:
    """The config class of every method, by its `method` name."""
    return {name: module.CONFIG for name, module in _modules().items()}


def method_class(name: str):
    """The crisp.driver.Method subclass of method `name`."""
    return _modules()[name].METHOD
