"""crisp as an installed tool: the packaged configs found by name from any directory, a wheel
that works outside the checkout, a command line that reads as a tool, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import crisp
from crisp import cli
from crisp.config import ConfigError
from crisp.resources import config_names, configs_dir, find_config, resolve_config, summary

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = Path(crisp.__file__).parent / "configs"

# ---------------------------------------------------------------------------------------------
# the packaged configs
# ---------------------------------------------------------------------------------------------


def test_packaged_configs_are_found_by_name():
    assert configs_dir() == PACKAGED
    recipes = sorted((PACKAGED / "recipes").glob("*.yaml"))
    demo = sorted((PACKAGED / "demo").glob("*.yaml"))
    assert len(recipes) >= 4 and {p.stem for p in demo} >= {"base", "crisp", "opsd", "siri", "eval"}
    for path in recipes:
        assert find_config(path.stem) == path
        assert find_config(f"recipes/{path.stem}.yaml") == path
    for path in demo:
        assert find_config(f"demo/{path.stem}") == path
    assert find_config("accelerate/ddp") == PACKAGED / "accelerate" / "ddp.yaml"
    # the method aliases are the published recipes
    assert find_config("crisp").read_text() == find_config("crisp-qwen3-8b").read_text()


def test_the_repository_configs_folder_is_the_packaged_one():
    """README commands such as `crisp train configs/demo/base.yaml` run from the checkout."""
    assert (ROOT / "configs").resolve() == (ROOT / "src" / "crisp" / "configs").resolve()


def test_a_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("demo/base") == PACKAGED / "demo" / "base.yaml"
    Path("eval").write_text("benchmarks: [synthetic]\n")
    assert resolve_config("eval") == Path("eval")
    own = tmp_path / "mine.yaml"
    own.write_text("method: sft\n")
    assert resolve_config(str(own)) == own


def test_an_unknown_name_is_one_line_that_lists_the_known_ones():
    with pytest.raises(ConfigError) as error:
        resolve_config("crisp-qwen3-80b")
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in config_names())


def test_crisp_recipes_lists_every_packaged_config_on_one_line(capsys):
    assert cli.run(["recipes"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert str(PACKAGED) in header
    listed = dict(line.split(maxsplit=1) for line in lines)
    assert list(listed) == config_names()
    for name, text in listed.items():
        path = find_config(name)
        if path.parent == PACKAGED:  # an alias
            assert text == f"same as {find_config(text.removeprefix('same as ')).stem}"
            assert find_config(text.removeprefix("same as ")).read_text() == path.read_text()
        else:  # the start of the file's first comment line
            first = next(line for line in path.read_text().splitlines() if line.startswith("#"))
            assert text and first.lstrip("# ").startswith(text)


def test_summary_is_the_first_comment_up_to_a_colon_or_full_stop(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("method: sft\n# SIRI on a tiny model: GRPO with a cap.\n# second line\n")
    assert summary(path) == "SIRI on a tiny model"
    path.write_text("# Version 1.5 of a recipe (see v1.4). More.\n")
    assert summary(path) == "Version 1.5 of a recipe (see v1.4)"
    path.write_text("method: sft\n")
    assert summary(path) == ""


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_help_says_what_crisp_does_and_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.run(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "think shorter" in text and "crisp recipes" in text and "crisp train crisp-qwen3-8b" in text
    assert "parse arguments" not in text and "library" not in text
    with pytest.raises(SystemExit) as done:
        cli.run(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"crisp {crisp.__version__}"


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("crisp: error: ") and err.count("\n") == 1, err
    return err


def test_a_hub_benchmark_without_datasets_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    err = _one_line_error(
        capsys, ["eval", "--model", str(tmp_path), "--benchmark", "math500", "--out", str(tmp_path / "out")]
    )
    assert "pip install 'crisp[hub]'" in err


def test_bad_input_on_the_command_line_is_one_line(tmp_path, capsys, tiny_model_dir):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: sft\n  max_steps: [\n")
    assert "bad.yaml, line 2: not valid YAML" in _one_line_error(capsys, ["train", str(bad_yaml)])
    assert "not valid YAML" in _one_line_error(capsys, ["eval", "--config", str(bad_yaml)])
    out = str(tmp_path / "out")
    assert "unknown data spec 'mathh500'" in _one_line_error(
        capsys, ["eval", "--model", str(tiny_model_dir), "--benchmark", "mathh500", "--out", out]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no config.json" in _one_line_error(
        capsys, ["eval", "--model", str(empty), "--benchmark", "synthetic", "--out", out]
    )
    assert "known: crisp-qwen3-8b" in _one_line_error(capsys, ["train", "crisp-qwen3"])


# ---------------------------------------------------------------------------------------------
# the project refers to nothing outside itself
# ---------------------------------------------------------------------------------------------

PROJECT_FILES = ("src", "tests", "bench", "docs", "README.md", "pyproject.toml", "Makefile")
# spelled in pieces, so that this file does not mention them either
OUTSIDE = (
    "REFERENCE" + ".md",
    "design" + " notes",
    ".." + "/shared",
    "TESTBED" + ".md",
    "VLLM" + ".md",
    "DESIGN" + ".md",
)


def test_no_file_refers_to_files_outside_the_project():
    files = [ROOT / name for name in PROJECT_FILES if (ROOT / name).is_file()]
    files += [
        path
        for name in PROJECT_FILES
        if (ROOT / name).is_dir()
        for path in (ROOT / name).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".md", ".yaml", ".toml")
    ]
    assert len(files) > 40
    found = [
        (path.relative_to(ROOT), word)
        for path in files
        for word in OUTSIDE
        if word.lower() in path.read_text(errors="replace").lower()
    ]
    assert found == []


def test_py_typed_ships_when_pyproject_declares_it():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject and (PACKAGED.parent / "py.typed").is_file()
    assert '"configs/*.yaml", "configs/*/*.yaml"' in pyproject


# ---------------------------------------------------------------------------------------------
# a wheel, installed outside the checkout
# ---------------------------------------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_configs_and_trains_a_demo_config(tmp_path):
    source = tmp_path / "source"  # only what a build needs: no configs symlink, no tests
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        cwd=tmp_path,
        env=dict(os.environ),
    )
    (wheel,) = (tmp_path / "dist").glob("crisp-*.whl")
    site = tmp_path / "site"
    _run(
        pip + ["install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        cwd=tmp_path,
        env=dict(os.environ),
    )
    shutil.rmtree(source)  # nothing may come from the build folder either

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed wheel, not the checkout
    crisp_cmd = [sys.executable, str(site / "bin" / "crisp")]
    where = _run([sys.executable, "-c", "import crisp; print(crisp.__file__)"], cwd=elsewhere, env=env).stdout
    assert Path(where.strip()).is_relative_to(site)

    assert "usage: crisp demo" in _run(crisp_cmd + ["demo", "--help"], cwd=elsewhere, env=env).stdout
    listing = _run(crisp_cmd + ["recipes"], cwd=elsewhere, env=env).stdout
    assert str(site / "crisp" / "configs") in listing and "demo/base" in listing
    _run(
        crisp_cmd + ["train", "demo/base", "max_steps=2", "data.size=64", "log_every=1", "output_dir=run"],
        cwd=elsewhere,
        env=env,
    )
    steps = [json.loads(line)["step"] for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    assert (elsewhere / "run" / "model" / "config.json").is_file()
