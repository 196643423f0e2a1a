"""python -m finetune.inspect: the rows as training sees them, trained tokens marked, wrong labels stop it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, run_cli

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France."]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "yes or no?"},
     {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and now?"},
     {"role": "assistant", "content": "no"}],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def inspect(model_dir, data_file, cache_dir, *extra):
    return run_cli([f"model.name_or_path={model_dir}", f"data.path={data_file}", *extra], cache_dir,
                   module="finetune.inspect")


def row_counts(stdout: str) -> list[tuple[int, int, int, int]]:
    return [tuple(map(int, m)) for m in
            re.findall(r"--- row \d+: (\d+) tokens: (\d+) prompt, (\d+) trained, (\d+) truncated", stdout)]


def test_instruction_rows_mark_the_answer_and_its_eos_as_trained(tiny_llama, instruction_file, cache_dir):
    done = inspect(tiny_llama, instruction_file, cache_dir, "data.format=instruction", "data.eval_fraction=0", "n=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "format: instruction, split: train, 3 of 36 rows" in done.stdout
    # The first rows of the file, in order, each trained on its sum and the end-of-turn token only.
    for a, b in [(0, 0), (0, 1), (0, 2)]:
        assert f"<|im_start|>user\nWhat is {a} plus {b}?<|im_end|>\n<|im_start|>assistant\n[[{a + b}<|im_end|>]]" \
            in done.stdout
    counts = row_counts(done.stdout)
    assert len(counts) == 3
    for tokens, prompt, trained, truncated in counts:
        assert (trained, truncated) == (2, 0) and prompt + trained == tokens  # the digit and <|im_end|>


def test_chat_rows_train_every_assistant_turn_and_text_rows_count_truncation(tiny_llama, tokenizer, cache_dir,
                                                                              tmp_path):
    chat = inspect(tiny_llama, write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS]), cache_dir,
                   "data.format=chat", "data.eval_fraction=0", "n=5")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "2 of 2 rows" in chat.stdout
    assert "[[Paris.<|im_end|>]]" in chat.stdout
    assert "[[yes<|im_end|>]]\n<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n[[no<|im_end|>]]" \
        in chat.stdout
    assert "Answer briefly.<|im_end|>" in chat.stdout and "[[Answer" not in chat.stdout

    max_length = 12
    text = inspect(tiny_llama, write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS]), cache_dir,
                   "data.format=text", "data.eval_fraction=0", f"data.max_length={max_length}", "n=2")
    assert text.returncode == 0, text.stderr[-2000:]
    full = [len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in TEXTS]
    expected = [(min(n, max_length), 0, min(n, max_length), max(0, n - max_length)) for n in full]
    assert row_counts(text.stdout) == expected
    assert full[0] > max_length, "the test needs a row longer than data.max_length"


def test_a_format_that_trains_on_everything_stops_with_exit_2(tiny_llama, cache_dir, tmp_path):
    # Conversations that lost their user turns: the whole row becomes the answer.
    only_answers = [{"messages": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(4)]
    done = inspect(tiny_llama, write_jsonl(tmp_path / "answers.jsonl", only_answers), cache_dir,
                   "data.format=chat", "data.eval_fraction=0")
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "THE LABELS ARE WRONG" in done.stderr and "every row trains on all of its text" in done.stderr
    assert "--- row" not in done.stdout

    # The same rows are fine when training on prompts is asked for.
    meant = inspect(tiny_llama, tmp_path / "answers.jsonl", cache_dir, "data.format=chat", "data.eval_fraction=0",
                    "data.train_on_prompt=true", "n=1")
    assert meant.returncode == 0, meant.stderr[-2000:]


def test_a_format_that_trains_on_nothing_stops_with_exit_2(tiny_llama, instruction_file, cache_dir):
    # Every prompt is longer than max_length: no answer token survives truncation.
    done = inspect(tiny_llama, instruction_file, cache_dir, "data.format=instruction", "data.max_length=8")
    assert done.returncode == 2
    assert "TRAINS ON NOTHING" in done.stderr and "no target tokens" in done.stderr and "raise data.max_length" \
        in done.stderr


def test_bad_arguments_exit_2_before_anything_loads():
    for args, said in [(["n=zero"], "n='zero'"), (["split=test"], "split='test'"), (["data.max_lenght=3"],
                                                                                   "data.max_length")]:
        done = subprocess.run([sys.executable, "-m", "finetune.inspect", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and said in done.stderr, done.stderr


def test_colour_marks_trained_runs_on_a_terminal(tokenizer):
    from finetune.inspect import PROMPT_ON, RESET, TRAINED_ON, render_row

    ids = tokenizer("ab cd")["input_ids"]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    last = tokenizer.decode(ids[-1:])
    coloured = render_row(tokenizer, ids, labels, colour=True)
    assert coloured == f"{PROMPT_ON}{tokenizer.decode(ids[:-1])}{RESET}{TRAINED_ON}{last}{RESET}"
    assert render_row(tokenizer, ids, labels, colour=False) == f"{tokenizer.decode(ids[:-1])}[[{last}]]"
