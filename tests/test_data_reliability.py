"""finetune/data.py: every valid row arrives as written; unreadable files are clean errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from finetune.config import DataConfig
from finetune.data import IGNORE_INDEX, DataError, build_datasets, load_raw
from finetune.tiny import build_tiny_tokenizer
from tests.conftest import run_cli, tiny_run_args

EOS = "<|im_end|>"

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def targets(tok, labels) -> str:
    return tok.decode([x for x in labels if x != IGNORE_INDEX])


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------ fields as written


def numeric_rows() -> list[str]:
    """100 instruction rows: some answers words, some numeric strings, one a JSON number."""
    lines = []
    for i in range(100):
        if i == 40:
            output = 61  # a JSON number
        elif i % 2:
            output = str(i)  # "7": a string that parses as JSON
        else:
            output = f"answer {i}"
        lines.append(json.dumps({"instruction": f"question {i}", "output": output}))
    return lines


def test_numeric_answers_are_kept_as_text(tok, tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", numeric_rows())
    data = build_datasets(DataConfig(path=path, format="instruction"), tok, seed=0)
    r = data.report
    assert (r.rows, r.kept) == (100, 100), r.lines()
    assert not any(line.startswith("dropped") for line in r.lines())
    answers = sorted(targets(tok, labels) for labels in data.train["labels"])
    assert "61" + EOS in answers and "7" + EOS in answers and "answer 0" + EOS in answers


def test_all_numeric_answers_keep_every_row(tok, tmp_path):
    # JSON numbers and literals exactly as written: 1.50 stays "1.50", true stays "true".
    written = ["3", "1.50", "-2", "1e3", "true", '"null"', '"007"']
    lines = [f'{{"instruction": "q{i}", "output": {v}}}' for i, v in enumerate(written)]
    path = write_lines(tmp_path / "numbers.jsonl", lines)
    data = build_datasets(DataConfig(path=path, format="instruction"), tok, seed=0)
    assert (data.report.rows, data.report.kept) == (7, 7), data.report.lines()
    answers = sorted(targets(tok, labels).removesuffix(EOS) for labels in data.train["labels"])
    assert answers == sorted(["3", "1.50", "-2", "1e3", "true", "null", "007"])


def test_numbers_in_chat_content_and_csv_columns_become_text(tok, tmp_path):
    conversation = {"messages": [{"role": "user", "content": "six times seven?"},
                                 {"role": "assistant", "content": 42}]}
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(conversation)])
    data = build_datasets(DataConfig(path=path), tok, seed=0)
    assert targets(tok, data.train[0]["labels"]).startswith("42")

    csv = tmp_path / "sums.csv"
    csv.write_text("instruction,output\nwhat is 1+1,2\nwhat is 2+2,4\nsay NA,NA\n")
    data = build_datasets(DataConfig(path=str(csv)), tok, seed=0)
    assert (data.report.rows, data.report.kept) == (3, 3), data.report.lines()
    assert sorted(targets(tok, labels) for labels in data.train["labels"]) == [f"{a}{EOS}" for a in "24"] + [
        "NA" + EOS]


def test_strings_stay_strings_in_a_column_that_also_holds_lists(tok, tmp_path):
    # A list in one row makes the column JSON-typed; its strings must not be parsed as JSON there.
    outputs = ["7", "null", "1.50", "true", ["a", "list"]]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"instruction": f"q{i}", "output": o})
                                              for i, o in enumerate(outputs)])
    data = build_datasets(DataConfig(path=path, format="instruction"), tok, seed=0)
    assert (data.report.rows, data.report.kept) == (5, 4), data.report.lines()
    answers = sorted(targets(tok, labels).removesuffix(EOS) for labels in data.train["labels"])
    assert answers == sorted(["7", "null", "1.50", "true"])


def test_drops_are_counted_by_reason_with_an_example_row(tok, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    rows[4]["output"] = ""
    rows[16]["output"] = "  "
    rows[9].pop("output")
    rows[11]["output"] = None
    rows[13]["output"] = ["a", "list"]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    report = build_datasets(DataConfig(path=path, format="instruction"), tok, seed=0).report
    assert (report.rows, report.kept) == (20, 15)
    dropped = next(line for line in report.lines() if line.startswith("dropped"))
    assert "2 with an empty 'output' (e.g. row 5)" in dropped, dropped
    assert "2 with a missing 'output' (e.g. row 10)" in dropped, dropped
    assert "1 with 'output' of type list (e.g. row 14)" in dropped, dropped


# ------------------------------------------------------------------------------- unreadable files


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + '{"instruction": "café", "output": "a"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as err:
        load_raw(DataConfig(path=str(path)))
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "UTF-8" in str(err.value)

    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"instruction,output\nq,a\n" + "q,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv.*line 3.*UTF-8"):
        load_raw(DataConfig(path=str(csv)))


def test_empty_file_says_empty(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.csv"):
        (tmp_path / name).write_text("" if name != "empty.json" else "\n \n")
        with pytest.raises(DataError, match=rf"{name}.* is empty"):
            load_raw(DataConfig(path=str(tmp_path / name)))


def test_malformed_json_line_names_its_line(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(6)]
    lines[3] = '{"instruction": "q3", "output": "a"'  # the closing brace is missing
    path = write_lines(tmp_path / "broken.jsonl", lines)
    with pytest.raises(DataError, match=r"broken\.jsonl, line 4: not valid JSON"):
        load_raw(DataConfig(path=path))
    path = write_lines(tmp_path / "scalar.jsonl", [lines[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"scalar\.jsonl, line 2: .*a JSON object"):
        load_raw(DataConfig(path=path))


def test_invalid_utf8_through_the_cli_exits_2(tiny_llama, cache_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(b"\n".join([good] * 5 + [b'{"instruction": "\xff", "output": "a"}']) + b"\n")
    result = run_cli(tiny_run_args(tiny_llama, path, tmp_path / "run"), cache_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "finetune data error" in result.stderr and f"{path}, line 6" in result.stderr, result.stderr[-2000:]
