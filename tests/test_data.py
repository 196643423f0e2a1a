"""finetune/data.py: loading, rendering, label masking, length policy, collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from tokenizers.processors import TemplateProcessing

from finetune.config import DataConfig
from finetune.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    build_datasets,
    encode_prompt,
    load_raw,
    render_prompt,
    resolve_format,
)
from finetune.tiny import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EOS = "<|im_end|>"

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def plain_tok():
    """The tiny tokenizer without a chat template, so instruction data takes the Alpaca path."""
    t = build_tiny_tokenizer()
    t.chat_template = None
    return t


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(*turns: str) -> dict:
    """A conversation alternating user / assistant, starting with the user."""
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]}


def targets(tok, labels) -> str:
    return tok.decode([x for x in labels if x != IGNORE_INDEX])


def prompt_len(labels) -> int:
    return next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------ labels


def test_eos_is_labelled_even_when_pad_equals_eos(tok, tmp_path):
    assert tok.pad_token_id == tok.eos_token_id  # the case this test protects
    path = write_jsonl(
        tmp_path / "d.jsonl", [chat("Capital of France?", "Answer: Paris."), chat("Hi", "Hello")]
    )
    data = build_datasets(DataConfig(path=path), tok, seed=0)
    rows = [data.train[i] for i in range(2)]
    for row in rows:
        assert row["input_ids"][-2] == tok.eos_token_id  # ChatML ends "<|im_end|>\n"
        last_target = max(i for i, x in enumerate(row["labels"]) if x != IGNORE_INDEX)
        assert last_target == len(row["input_ids"]) - 2
        assert row["labels"][last_target] == tok.eos_token_id
    batch = Collator(tok.pad_token_id)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["input_ids"].shape[1] > n  # the shorter row really was padded
    assert batch["labels"][short, n - 2].item() == tok.eos_token_id
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()


def test_chat_labels_only_the_assistant_turn(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("What is 2 + 2?", "Answer: 4.")])
    data = build_datasets(DataConfig(path=path), tok, seed=0)
    row = data.train[0]
    assert data.format == "chat"
    assert targets(tok, row["labels"]) == "Answer: 4." + EOS
    prompt = tok.decode(row["input_ids"][: prompt_len(row["labels"])])
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert row["labels"][-1] == IGNORE_INDEX  # the template's newline after <|im_end|>


def test_multi_turn_chat_labels_every_assistant_turn_and_nothing_else(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("one", "Answer: 1.", "two", "Answer: 2.")])
    row = build_datasets(DataConfig(path=path), tok, seed=0).train[0]
    assert targets(tok, row["labels"]) == f"Answer: 1.{EOS}Answer: 2.{EOS}"
    # Two separate runs of labels: the second user turn between them is masked.
    runs = sum(
        1
        for i, x in enumerate(row["labels"])
        if x != IGNORE_INDEX and (i == 0 or row["labels"][i - 1] == IGNORE_INDEX)
    )
    assert runs == 2
    masked = tok.decode(
        [t for t, x in zip(row["input_ids"], row["labels"], strict=True) if x == IGNORE_INDEX]
    )
    assert "two" in masked and "one" in masked and "Answer" not in masked


def test_chat_system_prompt_added_only_when_missing(tok, tmp_path):
    with_system = {"messages": [{"role": "system", "content": "Own."}, *chat("q", "a")["messages"]]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), with_system])
    data = build_datasets(DataConfig(path=path, system_prompt="Be terse."), tok, seed=0)
    texts = [tok.decode(data.train[i]["input_ids"]) for i in range(2)]
    assert texts[0].startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nq")
    assert texts[1].startswith("<|im_start|>system\nOwn.<|im_end|>\n") and "Be terse." not in texts[1]


def test_instruction_through_chat_template(tok, tmp_path):
    rows = [{"instruction": "Capital of France?", "input": "", "output": "Paris"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}]  # fmt: skip
    data = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), tok, seed=0)
    assert data.format == "instruction"
    first, second = data.train[0], data.train[1]
    assert targets(tok, first["labels"]) == "Paris" + EOS
    assert tok.decode(first["input_ids"][: prompt_len(first["labels"])]) == (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_start|>user\nAdd\n\n2 and 3<|im_end|>" in tok.decode(second["input_ids"])


def test_instruction_alpaca_template_without_chat_template(plain_tok, tmp_path):
    rows = [{"instruction": "Capital of France?", "input": "Europe", "output": "Paris"}]
    row = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), plain_tok, seed=0).train[0]
    assert plain_tok.decode(row["input_ids"]) == (
        "### Instruction:\nCapital of France?\n\nEurope\n\n### Response:\nParis" + EOS
    )
    assert targets(plain_tok, row["labels"]) == "Paris" + EOS
    assert row["labels"][-1] == plain_tok.eos_token_id == plain_tok.pad_token_id


def test_instruction_prompt_template(tok, tmp_path):
    rows = [{"q": "Capital of France?", "a": "Paris"}]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="q", response_field="a",
                     prompt_template="Q: {prompt}\nA:")  # fmt: skip
    row = build_datasets(cfg, tok, seed=0).train[0]
    assert tok.decode(row["input_ids"]) == "Q: Capital of France?\nA:Paris" + EOS
    assert targets(tok, row["labels"]) == "Paris" + EOS


def test_train_on_prompt_labels_everything(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("one", "Answer: 1.", "two", "Answer: 2.")])
    row = build_datasets(DataConfig(path=path, train_on_prompt=True), tok, seed=0).train[0]
    assert row["labels"] == row["input_ids"]


def test_text_format_labels_every_token_and_appends_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The quick brown fox."}])
    data = build_datasets(DataConfig(path=path), tok, seed=0)
    row = data.train[0]
    assert data.format == "text"
    assert tok.decode(row["input_ids"]) == "The quick brown fox." + EOS
    assert row["labels"] == row["input_ids"]
    assert data.report.train_tokens == data.report.target_tokens == len(row["input_ids"])


def test_special_tokens_are_not_added_twice(tmp_path):
    """A tokenizer that adds BOS itself: chat templates already write it, plain text gets it once."""
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.chat_template = "<|endoftext|>" + tok.chat_template
    chat_row = build_datasets(
        DataConfig(path=write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")])), tok, 0
    ).train[0]
    assert chat_row["input_ids"].count(0) == 1 and chat_row["input_ids"][0] == 0
    text_row = build_datasets(
        DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}])), tok, 0
    ).train[0]
    assert text_row["input_ids"].count(0) == 1 and text_row["input_ids"][0] == 0
    assert text_row["labels"][0] == IGNORE_INDEX  # BOS is no target
    assert text_row["labels"][1:] == text_row["input_ids"][1:]


def test_template_without_prefix_property_is_an_error(tmp_path):
    tok = build_tiny_tokenizer()
    # Marks the last message, so a conversation renders differently from its prefixes.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [last]{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", "q2", "a2")])
    with pytest.raises(DataError, match="chat template"):
        build_datasets(DataConfig(path=path), tok, seed=0)


# ---------------------------------------------------------------------------------------- sources


ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "folder"])
def test_local_file_types_load(tok, tmp_path, kind):
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "jsonl":
        path = Path(write_jsonl(tmp_path / "d.jsonl", ROWS))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        write_jsonl(path / "part1.jsonl", ROWS[:2])
        write_jsonl(path / "part2.jsonl", ROWS[2:])
    data = build_datasets(DataConfig(path=str(path)), tok, seed=0)
    assert data.format == "instruction"
    assert data.report.rows == data.report.kept == data.report.train_rows == 4
    assert sorted(targets(tok, r) for r in data.train["labels"]) == [f"a{i}{EOS}" for i in range(4)]


def test_embedded_dataset_loads(tok):
    data = build_datasets(DataConfig(path="embedded:terse_answers"), tok, seed=0)
    assert data.format == "chat"
    assert data.report.rows == data.report.kept >= 300
    assert data.eval is None
    for labels in data.train["labels"][:50]:
        answer = targets(tok, labels)
        assert answer.startswith("Answer: ") and answer.endswith("." + EOS), answer
    assert max(len(ids) for ids in data.train["input_ids"]) < 64


def test_embedded_dataset_is_what_the_script_generates():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "run python scripts/make_demo_data.py and commit the result"
    questions = [q for q, _ in script.questions()]
    assert not set(script.HELD_OUT) & set(questions)
    assert not any("Japan" in q for q in questions)


def test_unknown_embedded_name_lists_the_shipped_ones():
    with pytest.raises(DataError, match="embedded:terse_answers"):
        load_raw(DataConfig(path="embedded:nope"))


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(DataConfig(path=str(tmp_path / "missing.jsonl")))


def test_hub_failure_says_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="point data.path at a local") as err:
        load_raw(DataConfig(path="someone/some-dataset"))
    assert "ConnectionError" in str(err.value)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [(["messages", "text"], "chat"), (["instruction", "output", "text"], "instruction"), (["text"], "text")],
)
def test_auto_format_from_columns(columns, expected):
    assert resolve_format(DataConfig(), columns) == expected


def test_auto_format_error_names_columns_and_keys(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(path=path), tok, seed=0)
    message = str(err.value)
    assert "['question', 'answer']" in message
    assert "data.format" in message and "data.prompt_field" in message


def test_explicit_format_missing_column_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="data.messages_field"):
        build_datasets(DataConfig(path=path, format="chat"), tok, seed=0)


# ------------------------------------------------------------------------------------ length, drops


def long_rows(tmp_path) -> str:
    return write_jsonl(tmp_path / "d.jsonl", [chat("q", "short"), chat("q", "a long answer " * 20)])


def test_truncate_cuts_and_counts(tok, tmp_path):
    data = build_datasets(DataConfig(path=long_rows(tmp_path), max_length=24), tok, seed=0)
    r = data.report
    assert (r.rows, r.kept, r.truncated, r.dropped_too_long) == (2, 2, 1, 0)
    assert sorted(len(ids) for ids in data.train["input_ids"])[-1] == 24


def test_drop_policy_drops_and_counts(tok, tmp_path):
    data = build_datasets(DataConfig(path=long_rows(tmp_path), max_length=24, length_policy="drop"), tok, 0)
    r = data.report
    assert (r.rows, r.kept, r.truncated, r.dropped_too_long) == (2, 1, 0, 1)
    assert targets(tok, data.train[0]["labels"]) == "short" + EOS
    assert any("longer than data.max_length" in line for line in r.lines())


def test_prompt_longer_than_max_length_is_dropped(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "ok"), chat("a very long question " * 20, "ok")])
    data = build_datasets(DataConfig(path=path, max_length=24), tok, seed=0)
    r = data.report
    assert (r.rows, r.kept, r.dropped_no_target, r.truncated) == (2, 1, 1, 0)


def test_invalid_rows_are_dropped_and_counted(tok, tmp_path):
    rows = [
        {"instruction": "q", "output": "good"},
        {"instruction": "", "output": "a"},
        {"instruction": "   \n", "output": "a"},
        {"instruction": "q"},  # missing response
        {"instruction": None, "output": "a"},
        {"instruction": 7, "output": "a"},  # a number is its text: kept
        {"instruction": "q", "output": "a", "input": 3},  # kept
    ]
    data = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), tok, seed=0)
    r = data.report
    assert (r.rows, r.kept, r.dropped_empty, r.dropped_too_long, r.dropped_no_target) == (7, 3, 4, 0, 0)
    assert targets(tok, data.train[0]["labels"]) == "good" + EOS


def test_invalid_chat_rows_are_dropped_and_counted(tok, tmp_path):
    rows = [
        chat("q", "good"),
        {"messages": []},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},  # no content
        {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},  # no role
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": None},
        {"messages": ["q", "a"]},
    ]
    data = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), tok, seed=0)
    assert (data.report.rows, data.report.kept, data.report.dropped_empty) == (8, 1, 7)


def test_nothing_left_raises_with_counts(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "  "}, {"text": None}])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(path=path), tok, seed=0)
    assert "all 3 rows" in str(err.value)
    assert "2 with an empty 'text' (e.g. row 1)" in str(err.value)
    assert "1 with a missing 'text' (e.g. row 3)" in str(err.value)


def test_max_samples_takes_the_first_rows(tok, tmp_path):
    rows = [{"text": f"row {i}"} for i in range(10)]
    data = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), max_samples=3), tok, 0)
    assert [tok.decode(ids) for ids in data.train["input_ids"]] == [f"row {i}{EOS}" for i in range(3)]


# ------------------------------------------------------------------------------------------- eval


def test_eval_split(tok, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"train {i}"} for i in range(5)])
    write_jsonl(folder / "test.jsonl", [{"text": f"test {i}"} for i in range(2)])
    data = build_datasets(DataConfig(path=str(folder), eval_split="test"), tok, seed=0)
    assert (data.report.rows, data.report.train_rows, data.report.eval_rows) == (7, 5, 2)
    assert tok.decode(data.eval[0]["input_ids"]) == "test 0" + EOS
    with pytest.raises(DataError, match="its splits are: train, test"):
        build_datasets(DataConfig(path=str(folder), eval_split="validation"), tok, seed=0)


def test_eval_fraction_is_a_seeded_hold_out(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)])
    cfg = DataConfig(path=path, eval_fraction=0.25)
    a, b = build_datasets(cfg, tok, seed=1), build_datasets(cfg, tok, seed=1)
    assert (a.report.train_rows, a.report.eval_rows, a.report.kept) == (15, 5, 20)
    assert a.eval["input_ids"] == b.eval["input_ids"]
    train = {tuple(ids) for ids in a.train["input_ids"]}
    assert not train & {tuple(ids) for ids in a.eval["input_ids"]}
    assert a.report.train_tokens == sum(len(ids) for ids in a.train["input_ids"])


# ----------------------------------------------------------------------------------------- collator


def test_collator_pads_right():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(pad_token_id=2)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pads_to_the_smallest_allowed_width():
    collate = Collator(pad_token_id=0, widths=[16, 8])
    batch = collate([{"input_ids": [1] * 9, "labels": [1] * 9}])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 9
    assert (batch["labels"][0, 9:] == IGNORE_INDEX).all()
    assert collate([{"input_ids": [1] * 5, "labels": [1] * 5}])["input_ids"].shape == (1, 8)
    # longer than every allowed width: its own width, nothing cut
    assert collate([{"input_ids": [1] * 20, "labels": [1] * 20}])["input_ids"].shape == (1, 20)


def test_compiled_runs_pad_to_a_few_widths_never_past_max_length():
    from finetune.config import SpeedConfig
    from finetune.speed import batch_widths

    assert batch_widths(SpeedConfig(compile=False), False, 2048) is None  # uncompiled: the batch's own width
    assert batch_widths(SpeedConfig(compile=True), False, 2048) == [512, 1024, 1536, 2048]
    # rounded up to multiples of 128, but never past data.max_length
    assert batch_widths(SpeedConfig(compile=True), False, 1000) == [256, 512, 768, 1000]
    assert batch_widths(SpeedConfig(compile=True, width_buckets=1), False, 2048) == [2048]
    assert batch_widths(SpeedConfig(compile=True), False, 64) == [64]
    # packed rows and CUDA graphs: one width, data.max_length
    assert batch_widths(SpeedConfig(compile=True), True, 1000) == [1000]
    assert batch_widths(SpeedConfig(compile=True, cuda_graphs=True), False, 1000) == [1000]
    collate = Collator(0, widths=batch_widths(SpeedConfig(compile=True), False, 1000))
    widths = {collate([{"input_ids": [1] * n, "labels": [1] * n}])["input_ids"].shape[1] for n in range(1, 1001, 7)}
    assert widths == {256, 512, 768, 1000}


# ----------------------------------------------------------------------------------- render_prompt


@pytest.mark.parametrize("setup", ["chat", "instruction_chat", "alpaca", "prompt_template"])
def test_render_prompt_matches_training_prefix(tmp_path, setup):
    tok = build_tiny_tokenizer()
    kw: dict = {"system_prompt": "Be terse."}
    if setup == "chat":
        rows = [chat("What is 2 + 2?", "Answer: 4.")]
    else:
        rows = [{"instruction": "What is 2 + 2?", "output": "Answer: 4."}]
    if setup == "alpaca":
        tok.chat_template = None
    if setup == "prompt_template":
        kw["prompt_template"] = "Q: {prompt}\nA: "
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), **kw)
    data = build_datasets(cfg, tok, seed=0)
    row = data.train[0]
    n = prompt_len(row["labels"])
    text = render_prompt(cfg, tok, "What is 2 + 2?", data.format)
    assert tok.decode(row["input_ids"]).startswith(text)
    assert "Be terse." in text
    if setup == "prompt_template":
        # "A: " + "Answer" tokenizes as "A:", " Answer": the trailing space belongs to the response token.
        assert text.endswith("A: ")
    else:
        assert encode_prompt(cfg, tok, "What is 2 + 2?", data.format) == row["input_ids"][:n]
        assert tok.decode(row["input_ids"][:n]) == text
