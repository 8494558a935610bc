"""The configs that ship inside the package: the demo's, the recipes for real models and the
accelerate files, found by name through importlib.resources, so that an installed crisp finds
them from any working directory.

A name is a config's path under the packaged ``configs/`` folder without ``.yaml``; ``recipes/``
may be left out: ``crisp-qwen3-8b``, ``eval`` (the evaluation recipe), ``demo/base``,
``accelerate/ddp``.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from crisp.config import ConfigError

PREFIXED = ("demo", "accelerate")  # folders whose configs are named with the folder; recipes/ without
SUFFIX = ".yaml"


def configs_dir() -> Path:
    """The packaged configs folder. pip installs packages as files, so this is a real folder, whose
    files accelerate can read and users can copy to edit."""
    with resources.as_file(resources.files("crisp") / "configs") as path:
        return Path(path)


def _names(root: Path) -> dict[str, Path]:
    """Every packaged config by name: the recipes, the method aliases beside them (crisp, opsd,
    siri), then the other sections with their folder as prefix."""
    names = {path.stem: path for path in sorted((root / "recipes").glob("*" + SUFFIX))}
    names.update({path.stem: path for path in sorted(root.glob("*" + SUFFIX)) if path.stem not in names})
    for folder in PREFIXED:
        names.update({f"{folder}/{path.stem}": path for path in sorted((root / folder).glob("*" + SUFFIX))})
    return names


def config_names() -> list[str]:
    return list(_names(configs_dir()))


def find_config(name: str) -> Path:
    """The packaged config called ``name`` (a trailing ``.yaml`` is allowed); a ConfigError listing
    the known names if there is none."""
    names = _names(configs_dir())
    key = name.removesuffix(SUFFIX).removeprefix("recipes/")
    if key not in names:
        raise ConfigError(
            f"{name}: no such config file, and no packaged config of that name (known: {', '.join(names)})"
        )
    return names[key]


def resolve_config(spec: str) -> Path:
    """``spec`` as a file if one exists there, else the packaged config of that name."""
    path = Path(spec)
    return path if path.is_file() else find_config(spec)


def summary(path: Path) -> str:
    """A YAML file's first ``#`` comment line up to its first colon or full stop ('' without one):
    the headers open with what the file is ("CRISP as published on Qwen3-8B: ...")."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return re.split(r"[:.](?:\s|$)", line.lstrip("#").strip(), maxsplit=1)[0]
    return ""


def describe_configs() -> list[tuple[str, str]]:
    """(name, description) of every packaged config: its first comment line, or, for the method
    aliases beside the recipes, which recipe they are a copy of."""
    root = configs_dir()
    names = _names(root)
    recipe_of_text = {path.read_text(): name for name, path in names.items() if path.parent.name == "recipes"}
    rows = []
    for name, path in names.items():
        recipe = recipe_of_text.get(path.read_text()) if path.parent == root else None
        rows.append((name, f"same as {recipe}" if recipe else summary(path)))
    return rows
