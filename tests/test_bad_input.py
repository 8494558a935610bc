"""Bad input stops a run before any model is built, with a message naming what to fix; and the
safety rules: weights only as safetensors (or torch.load with weights_only=True), no remote code
unless the config turns it on, no data text evaluated as code."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

import crisp
import crisp.config
from crisp import checkpoint, cli
from crisp.config import validate
from crisp.modeling import load_model, load_tokenizer

SRC = Path(crisp.__file__).resolve().parent


def run_config(method: str, data_source: str, model_path: str, out: Path) -> dict:
    data = {
        "method": method,
        "output_dir": str(out),
        "max_steps": 1,
        "model": {"path": model_path},
        "data": {"source": data_source, "size": 8},
        "prompt": {"template": "plain"},
    }
    if method == "grpo":
        data.update(group_size=2, batch_size=1, schedule={"l_min": 4, "l_max": 4})
    return data


@pytest.fixture()
def no_model_loading(tmp_path) -> str:
    """A model path with no model behind it: a run that got as far as loading its model would
    report that (crisp.modeling.check_model_path) instead of the bad input."""
    return str(tmp_path / "no-model-here")


def cli_error(tmp_path: Path, data: dict, capsys) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", str(path)])
    assert info.value.code == 2
    return capsys.readouterr().err


GOOD = {"id": "p1", "question": "Start with 1.\nFirst + 1\nWhat is the result?", "answer": "2"}


@pytest.mark.parametrize("method", ["selfdistill", "grpo"])
@pytest.mark.parametrize(
    "content, line, field",
    [
        (json.dumps(GOOD) + '\n{"id": "p2", "question": \n', 2, None),  # invalid JSON
        (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "p2", "answer": ""}) + "\n", 2, "answer"),  # empty
        (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "p2", "question": 7}) + "\n", 2, "question"),  # type
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", 2, "id"),  # duplicate id
        (json.dumps(GOOD) + "\n" + json.dumps({"id": "p2", "question": "x"}) + "\n", 2, "answer"),  # missing
        (json.dumps(GOOD).encode() + b'\n{"id": "p2", "question": "\xff"}\n', 2, None),  # not UTF-8
    ],
    ids=["invalid-json", "empty-field", "wrong-type", "duplicate-id", "missing-field", "non-utf8"],
)
def test_bad_data_file_stops_the_run_before_any_model_naming_file_line_and_field(
    method, content, line, field, tmp_path, no_model_loading, capsys
):
    data_file = tmp_path / "problems.jsonl"
    data_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = cli_error(tmp_path, run_config(method, str(data_file), no_model_loading, tmp_path / "run"), capsys)
    assert f"{data_file}, line {line}" in err and "model path" not in err
    if field:
        assert f"field '{field}'" in err


@pytest.mark.parametrize("method", ["selfdistill", "grpo"])
def test_missing_model_path_is_a_clear_error(method, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    err = cli_error(tmp_path, run_config(method, "synthetic", str(missing), tmp_path / "run"), capsys)
    assert f"model path {missing} does not exist" in err
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(missing))


VLLM_INSTALLED = crisp.config.vllm_installed()  # CI installs it (make setup-vllm)


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed: the test below checks that the backend is accepted")
@pytest.mark.parametrize("method", ["selfdistill", "grpo"])
def test_the_vllm_backend_without_the_engine_names_the_install_command(
    method, tmp_path, tiny_model_dir, no_model_loading, monkeypatch, capsys
):
    data = run_config(method, "synthetic", no_model_loading, tmp_path / "run")
    data["rollout"] = {"backend": "vllm"}
    err = cli_error(tmp_path, data, capsys)
    assert "rollout: " in err and "backend: vllm" in err
    assert "pip install -e '.[vllm]'" in err and "make setup-vllm" in err
    monkeypatch.chdir(tmp_path)
    assert (
        cli.run(["eval", "--model", str(tiny_model_dir), "--benchmark", "synthetic", "--out", "e", "--backend", "vllm"])
        == 2
    )
    assert "make setup-vllm" in capsys.readouterr().err


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed: the test above checks the error")
@pytest.mark.parametrize("method", ["selfdistill", "grpo"])
def test_the_vllm_backend_with_the_engine_installed_is_accepted(method, tmp_path, tiny_model_dir):
    data = run_config(method, "synthetic", str(tiny_model_dir), tmp_path / "run")
    data["rollout"] = {"backend": "vllm"}
    assert validate(data).rollout.backend == "vllm"
    evaluation = validate(
        {"model": {"path": str(tiny_model_dir)}, "benchmarks": ["synthetic"], "output_dir": "e", "backend": "vllm"},
        crisp.config.EvalRunConfig,
    )
    assert evaluation.backend == "vllm"


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed: the backend is refused before the lengths")
@pytest.mark.parametrize(
    "method, lengths, key",
    [
        (
            "selfdistill",
            {"rollout": {"backend": "vllm", "max_new_tokens": 64, "vllm": {"max_model_len": 64}}},
            "rollout.max_new_tokens (64)",
        ),
        (
            "selfdistill",
            {
                "rollout": {"backend": "vllm", "max_new_tokens": 16, "vllm": {"max_model_len": 64}},
                "eval": {"sampling": {"max_new_tokens": 100}},
            },
            "eval.sampling.max_new_tokens (100)",
        ),
        ("grpo", {"rollout": {"backend": "vllm", "vllm": {"max_model_len": 4}}}, "rollout.max_new_tokens (4)"),
    ],
)
def test_a_vllm_max_model_len_below_the_responses_is_an_error_naming_the_key(
    method, lengths, key, tmp_path, no_model_loading, capsys
):
    err = cli_error(
        tmp_path, {**run_config(method, "synthetic", no_model_loading, tmp_path / "run"), **lengths}, capsys
    )
    assert "rollout.vllm.max_model_len" in err and key in err


# ---------------------------------------------------------------------------------------------
# safety
# ---------------------------------------------------------------------------------------------


def test_pickled_weights_are_never_loaded(tiny_model, tmp_path):
    """A model directory whose weights are only a pickle (pytorch_model.bin) is refused."""
    tiny_model.config.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(tmp_path))


class Payload:
    """Unpickling this runs code (it creates a file): what weights_only=True refuses."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_state_with_arbitrary_objects_is_refused(tiny_model, loaded_tokenizer, tmp_path):
    checkpoint.save(tmp_path, 1, models={"model": (tiny_model, loaded_tokenizer)}, state={})
    path = checkpoint.save(tmp_path, 2, models={"model": (tiny_model, loaded_tokenizer)}, state={})
    torch.save({"step": 2, "payload": Payload(tmp_path / "code_ran")}, path / "state.pt")
    marker = json.loads((path / checkpoint.MARKER).read_text())
    marker["files"]["state.pt"] = (path / "state.pt").stat().st_size  # sizes agree: only the content is bad
    (path / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.warns(UserWarning, match="step-00000002"):
        assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("model_type", ["llama", "unknown-to-transformers"])
def test_remote_code_is_never_run_unless_the_config_turns_it_on(model_type, tiny_model_dir, tmp_path):
    """A model directory that ships its own Python code: without trust_remote_code (the default) a
    known architecture loads with the library's own class, an unknown one is refused, and the
    shipped code is never imported."""
    marker = tmp_path / "code_ran"
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom_code.Config", "AutoModelForCausalLM": "custom_code.Model"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "custom_code.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")

    assert (
        validate(
            {"method": "selfdistill", "output_dir": "x", "max_steps": 1, "model": {"path": str(model_dir)}}
        ).model.trust_remote_code
        is False
    )
    if model_type == "llama":
        assert type(load_model(str(model_dir))).__module__.startswith("transformers.")
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_model(str(model_dir))
    assert not marker.exists()


def test_the_source_never_evaluates_text_or_unpickles_freely():
    """No eval/exec/compile, no pickle, no yaml.load (only safe_load), and every torch.load call
    passes weights_only=True."""
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names):
                    offences.append(f"{path.name}:{node.lineno} imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                offences.append(f"{path.name}:{node.lineno} calls {name}")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                offences.append(f"{path.name}:{node.lineno} calls yaml.{name}")
            if owner == "torch" and name == "load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (
                    weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value
                ):
                    offences.append(f"{path.name}:{node.lineno} calls torch.load without weights_only=True")
            for keyword in node.keywords:
                if (
                    keyword.arg == "trust_remote_code"
                    and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value
                ):
                    offences.append(f"{path.name}:{node.lineno} hard-codes trust_remote_code=True")
    assert not offences, offences
