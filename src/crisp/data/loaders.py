"""Load problems from the built-in synthetic task, a known benchmark on the Hub, or a local file.

Local files (.jsonl, .json holding an array, .parquet) may use any of these schemas, detected
from the fields of the first record:

- MATH-500: problem, answer, solution?, level?, unique_id?   (has ``problem`` and ``level``/``unique_id``)
- AIME:     problem, answer, solution?, id?                  (has ``problem``)
- GSM8K:    question, answer = "<solution> #### <gold>"      (has ``question``, no ``id``)
- crisp:    id, question, answer, solution?, difficulty?, source?

Every record is checked; a bad one raises DataError naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crisp.data.problems import Problem

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A bad data file or record; the message names the file, the 1-based line and the field."""


class MissingDependency(ImportError):
    """An optional package that what was asked for needs; the message says how to install it."""


@dataclass(frozen=True)
class Benchmark:
    """Where a named benchmark lives on the Hugging Face Hub, and its schema."""

    hub_id: str
    config: str | None
    split: str
    schema: str


BENCHMARKS: dict[str, Benchmark] = {
    # 500 MATH test problems; level 1-5 becomes `difficulty`
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "math500"),
    # AIME 2024 I and II, 30 problems
    "aime24": Benchmark("HuggingFaceH4/aime_2024", None, "train", "aime"),
    # AIME 2025 I and II, 30 problems in one split with the AIME 2024 field names
    # (opencompass/AIME2025 splits them into two configs and calls the field `question`)
    "aime25": Benchmark("yentinglin/aime_2025", None, "train", "aime"),
    # 1,319 grade-school word problems; the gold is the text after "####"
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "gsm8k"),
}


def load_problems(spec: str, *, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems from ``spec``: "synthetic", a name in BENCHMARKS, or a .jsonl/.json/.parquet path.

    ``split`` overrides a benchmark's default split; ``limit`` keeps the first N problems (the whole
    file is still validated).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec in BENCHMARKS:
        problems = _load_hub(spec, split)
    elif split is not None:
        names = ", ".join(BENCHMARKS)
        raise DataError(f"split={split!r} applies only to hub benchmarks ({names}), not to {spec!r}")
    elif spec == "synthetic":
        from crisp.data.synthetic import test_problems

        problems = test_problems()
    elif spec.endswith(FILE_SUFFIXES):
        problems = _load_file(Path(spec))
    else:
        raise DataError(
            f"unknown data spec {spec!r}: use 'synthetic', one of {', '.join(BENCHMARKS)}, "
            f"or a path ending in {', '.join(FILE_SUFFIXES)}"
        )
    return problems if limit is None else problems[:limit]


def _load_hub(name: str, split: str | None) -> list[Problem]:
    benchmark = BENCHMARKS[name]
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependency(
            f"loading {name!r} from the Hugging Face Hub needs the `datasets` package: pip install 'crisp[hub]'"
        ) from exc
    split = split or benchmark.split
    rows = datasets.load_dataset(benchmark.hub_id, benchmark.config, split=split)
    origin = f"{benchmark.hub_id} ({split})"
    records = ((f"{origin}, row {number}", row) for number, row in enumerate(rows, 1))
    return _to_problems(records, origin, source=name, schema=benchmark.schema)


def _load_file(path: Path) -> list[Problem]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        records = _read_json_array(path)
    else:
        records = _read_parquet(path)
    return _to_problems(records, str(path), source=path.stem, schema=None)


# ---------------------------------------------------------------------------------------------
# Readers: yield (where, record), where = "file, line N"
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            yield where, record


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    # decode element by element, so that each record knows the line it starts on
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        where = f"{path}, line {_line_of(text, position)}"
        raise DataError(f"{where}: a .json file must hold an array of objects")
    position = _skip_space(text, position + 1)
    if text.startswith("]", position):
        return
    while True:
        where = f"{path}, line {_line_of(text, position)}"
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            message = f"invalid JSON: {exc.msg} (column {exc.colno})"
            raise DataError(f"{path}, line {exc.lineno}: {message}") from exc
        yield where, record
        position = _skip_space(text, position)
        if text.startswith("]", position):
            return
        if not text.startswith(",", position):
            raise DataError(f"{path}, line {_line_of(text, position)}: invalid JSON: expected ',' or ']'")
        position = _skip_space(text, position + 1)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read parquet: {exc}") from exc
    for number, row in enumerate(rows, 1):
        yield f"{path}, row {number}", row


# ---------------------------------------------------------------------------------------------
# Records -> Problems
# ---------------------------------------------------------------------------------------------


def _to_problems(records: Iterable[tuple[str, Any]], origin: str, *, source: str, schema: str | None) -> list[Problem]:
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for index, (where, record) in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
        schema = schema or _detect_schema(record, where)
        problem = _to_problem(record, schema, where, source=source, index=index)
        if problem.id in first_seen:
            first = first_seen[problem.id]
            raise DataError(f"{where}: field 'id': duplicate id {problem.id!r} (first at {first})")
        first_seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise DataError(f"{origin}: no records")
    return problems


def _detect_schema(record: dict[str, Any], where: str) -> str:
    if "problem" in record:
        return "math500" if "unique_id" in record or "level" in record else "aime"
    if "question" in record:
        return "crisp" if "id" in record else "gsm8k"
    fields = ", ".join(sorted(record))
    raise DataError(f"{where}: field 'problem' or 'question': missing; cannot tell the schema from ({fields})")


def _to_problem(record: dict[str, Any], schema: str, where: str, *, source: str, index: int) -> Problem:
    default_id = f"{source}-{index}"
    if schema in ("math500", "aime"):  # the same fields but the id's name and MATH-500's level
        math500 = schema == "math500"
        return Problem(
            id=_optional(record, "unique_id" if math500 else "id", where, numbers=True) or default_id,
            question=_required(record, "problem", where),
            answer=_required(record, "answer", where, numbers=True),
            solution=_optional(record, "solution", where),
            difficulty=_optional(record, "level", where, numbers=True) if math500 else None,
            source=source,
        )
    if schema == "gsm8k":
        solution, marker, gold = _required(record, "answer", where).rpartition("####")
        if not marker or not gold.strip():
            raise DataError(f"{where}: field 'answer': no gold answer after '####' (GSM8K schema)")
        return Problem(
            id=default_id,
            question=_required(record, "question", where),
            answer=gold.strip(),
            solution=solution.strip() or None,
            source=source,
        )
    return Problem(
        id=_required(record, "id", where, numbers=True),
        question=_required(record, "question", where),
        answer=_required(record, "answer", where, numbers=True),
        solution=_optional(record, "solution", where),
        difficulty=_optional(record, "difficulty", where, numbers=True),
        source=_optional(record, "source", where) or source,
    )


def _optional(record: dict[str, Any], name: str, where: str, *, numbers: bool = False) -> str | None:
    """The field as a stripped string (numbers converted when allowed); None if absent or empty."""
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float) if numbers else str):
        kind = "a string or a number" if numbers else "a string"
        raise DataError(f"{where}: field {name!r}: must be {kind}, got {type(value).__name__}")
    return str(value).strip() or None


def _required(record: dict[str, Any], name: str, where: str, *, numbers: bool = False) -> str:
    value = _optional(record, name, where, numbers=numbers)
    if value is None:
        problem = "missing" if name not in record else f"empty ({record[name]!r})"
        raise DataError(f"{where}: field {name!r}: {problem}")
    return value
