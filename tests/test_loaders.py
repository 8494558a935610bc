"""Loading problems from local files: schemas, GSM8K gold parsing, and precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crisp.data.loaders import BENCHMARKS, DataError, load_problems
from crisp.data.problems import Problem

FIXTURES = Path(__file__).parent / "fixtures"


def test_math500_fixture() -> None:
    problems = load_problems(str(FIXTURES / "math500_sample.jsonl"))
    assert [p.answer for p in problems] == ["22", "\\frac{3}{7}", "2\\sqrt{5}", "(5, 4)", "(2, 3)"]
    assert [p.difficulty for p in problems] == ["1", "2", "3", "4", "5"]
    assert problems[0].id == "fixture/prealgebra/1.json"
    assert problems[1].question == "Write $\\frac{15}{35}$ in lowest terms."
    assert problems[2].solution is not None and "\\boxed{2\\sqrt{5}}" in problems[2].solution
    assert {p.source for p in problems} == {"math500_sample"}


def test_aime_fixture() -> None:
    problems = load_problems(str(FIXTURES / "aime_sample.jsonl"))
    assert [(p.id, p.answer) for p in problems] == [("101", "030"), ("102", "576"), ("103", "15")]
    assert all(p.difficulty is None and p.solution for p in problems)


@pytest.mark.parametrize("name", ["gsm8k_sample.jsonl", "gsm8k_sample.parquet"])
def test_gsm8k_fixture(name: str) -> None:
    problems = load_problems(str(FIXTURES / name))
    assert [p.answer for p in problems] == ["34", "128", "50"]
    assert [p.id for p in problems] == ["gsm8k_sample-0", "gsm8k_sample-1", "gsm8k_sample-2"]
    assert problems[0].solution is not None
    assert problems[0].solution.endswith("34 rolls are left.")
    assert "####" not in problems[0].solution
    assert problems[2].question.startswith("A school buys 1,250 pencils")


def test_gsm8k_gold_is_after_the_last_marker(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"question": "q", "answer": "a #### b\n####  1,000 "}])
    assert load_problems(str(path))[0].answer == "1,000"


def test_limit() -> None:
    path = str(FIXTURES / "math500_sample.jsonl")
    assert [p.answer for p in load_problems(path, limit=2)] == ["22", "\\frac{3}{7}"]
    assert load_problems(path, limit=0) == []
    assert len(load_problems(path, limit=100)) == 5
    with pytest.raises(ValueError, match="limit"):
        load_problems(path, limit=-1)


def test_crisp_schema_jsonl_json_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": "1+1?", "answer": 2, "difficulty": "Level 3"},
        {"id": 7, "question": "2+2?", "answer": "4", "solution": "2+2=4", "difficulty": 1, "source": "mine"},
    ]
    expected = [
        Problem("a", "1+1?", "2", None, "Level 3", "rows"),
        Problem("7", "2+2?", "4", "2+2=4", "1", "mine"),
    ]
    jsonl = _jsonl(tmp_path, rows, name="rows.jsonl")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert load_problems(str(jsonl)) == expected
    assert load_problems(str(array)) == expected


def test_blank_lines_and_bom_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "x", "question": "q", "answer": "1"}\n\n  \n')
    assert [p.id for p in load_problems(str(path))] == ["x"]


# ---------------------------------------------------------------------------------------------
# Bad input: DataError naming file, line and field
# ---------------------------------------------------------------------------------------------

GOOD = {"id": "p1", "question": "What is 2+3?", "answer": "5"}


def _jsonl(tmp_path: Path, rows: list[object], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_problems(str(path))
    return str(info.value)


@pytest.mark.parametrize(
    ("bad_row", "field", "fragment"),
    [
        ({"id": "p2", "question": "q"}, "answer", "missing"),
        ({"id": "p2", "question": "q", "answer": ""}, "answer", "empty"),
        ({"id": "p2", "question": "q", "answer": None}, "answer", "empty"),
        ({"id": "p2", "question": "   ", "answer": "1"}, "question", "empty"),
        ({"id": "p2", "question": ["q"], "answer": "1"}, "question", "must be a string"),
        ({"id": "p2", "question": "q", "answer": {"v": 1}}, "answer", "must be a string or a number"),
        ({"id": "p2", "question": "q", "answer": True}, "answer", "must be a string or a number"),
        ({"id": "p2", "question": "q", "answer": "1", "difficulty": [3]}, "difficulty", "must be"),
        ({"id": "p1", "question": "q", "answer": "1"}, "id", "duplicate id 'p1'"),
    ],
)
def test_bad_field(tmp_path: Path, bad_row: dict[str, object], field: str, fragment: str) -> None:
    path = _jsonl(tmp_path, [GOOD, GOOD | {"id": "p0"}, bad_row])
    message = _error(path)
    assert f"{path}, line 3" in message
    assert f"field '{field}'" in message
    assert fragment in message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"id": "p2", "question": "q",\n', encoding="utf-8")
    message = _error(path)
    assert f"{path}, line 2" in message and "invalid JSON" in message


def test_non_object_line(tmp_path: Path) -> None:
    message = _error(_jsonl(tmp_path, [GOOD, ["not", "an", "object"]]))
    assert "line 2" in message and "expected an object" in message


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"id": "p2", "question": "caf\xe9", "answer": "1"}\n')
    message = _error(path)
    assert f"{path}, line 2" in message and "UTF-8" in message


def test_unknown_schema(tmp_path: Path) -> None:
    message = _error(_jsonl(tmp_path, [{"prompt": "q", "answer": "1"}]))
    assert "line 1" in message and "field 'problem' or 'question'" in message


def test_gsm8k_without_marker(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"question": "q", "answer": "1 #### 1"}, {"question": "q2", "answer": "just 3"}])
    message = _error(path)
    assert "line 2" in message and "field 'answer'" in message and "####" in message


def test_math500_missing_problem_text(tmp_path: Path) -> None:
    row = {"problem": "p", "answer": "1", "level": 2, "unique_id": "u1"}
    path = _jsonl(tmp_path, [row, {"answer": "2", "level": 2, "unique_id": "u2", "problem": ""}])
    message = _error(path)
    assert "line 2" in message and "field 'problem'" in message


def test_json_array_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD | {"id": "p2", "answer": ""}], indent=2), encoding="utf-8")
    message = _error(path)
    assert f"{path}, line 7" in message and "field 'answer'" in message  # 2nd object starts on line 7
    path.write_text('[\n  {"id": "a", "question": "q", "answer": "1"},\n  {"id": oops}\n]', encoding="utf-8")
    message = _error(path)
    assert f"{path}, line 3" in message and "invalid JSON" in message
    path.write_text('{"id": "a", "question": "q", "answer": "1"}', encoding="utf-8")
    assert "array" in _error(path)


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"id": "p2", "answer": None}]), path)
    message = _error(path)
    assert f"{path}, row 2" in message and "field 'answer'" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n", encoding="utf-8")
    assert "no records" in _error(path)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data spec"):
        load_problems("data.csv")
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="split"):
        load_problems(str(FIXTURES / "aime_sample.jsonl"), split="test")


def test_benchmarks_table() -> None:
    assert set(BENCHMARKS) == {"math500", "aime24", "aime25", "gsm8k"}
    assert BENCHMARKS["math500"].hub_id == "HuggingFaceH4/MATH-500"
    assert (BENCHMARKS["gsm8k"].config, BENCHMARKS["gsm8k"].split) == ("main", "test")
    assert issubclass(DataError, ValueError)
