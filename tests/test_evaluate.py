"""python -m finetune.evaluate: base vs base+adapter loss and perplexity, quant modes side by side, lm-eval tasks."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, run_cli, tiny_run_args

from finetune.evaluate import perplexity, perplexity_line

TASKS = ROOT / "tests" / "data" / "lm_eval_tiny"


@pytest.fixture(scope="module")
def trained_run(tiny_llama, instruction_file, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "run"
    # lr high enough that the adapter visibly changes the loss in three steps; dropout off so the eval is exact.
    done = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "train.lr=0.02", "lora.dropout=0.0"), cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def evaluate(cache_dir, *args):
    return run_cli(list(args), cache_dir, module="finetune.evaluate")


def test_perplexity_is_exp_of_the_mean_token_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf
    assert perplexity_line(math.log(4.0)) == "eval loss 1.3863, perplexity 4.00"


def test_adapter_eval_split_matches_training_and_modes_sit_side_by_side(trained_run, cache_dir, tmp_path):
    out = tmp_path / "eval.json"
    done = evaluate(cache_dir, f"adapter={trained_run}", "quant.mode=nf4,none", f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["model"], r["quant"]): r for r in report["results"]}
    assert list(rows) == [("base", "nf4"), ("base+adapter", "nf4"), ("base", "none")]
    assert report["data"]["rows"] == 8  # the 0.2 of 36 rows held out in training, rebuilt from the manifest

    # The held-out split and the reloaded adapter reproduce the eval loss training logged at its end.
    summary = json.loads((trained_run / "summary.json").read_text())
    assert rows["base+adapter", "nf4"]["loss"] == pytest.approx(summary["eval_loss"][-1][1], rel=1e-3)
    # The adapter was trained: switching it off changes the loss; the 16-bit base is another model again.
    assert abs(rows["base", "nf4"]["loss"] - rows["base+adapter", "nf4"]["loss"]) > 1e-3
    assert rows["base", "none"]["loss"] != rows["base", "nf4"]["loss"]
    for r in rows.values():
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["target_tokens"] == rows["base", "nf4"]["target_tokens"] > 0
    table = done.stdout.split("held-out data:")[1]
    assert "base+adapter   nf4" in table and f"{rows['base', 'none']['perplexity']:.3f}" in table

    # Other held-out data: all of data.path is measured; results go to the run folder by default.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"instruction": f"What is {a} plus 9?", "output": str(a + 9)}) + "\n"
                             for a in range(5)))
    done = evaluate(cache_dir, f"adapter={trained_run}", f"data.path={other}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((trained_run / "evaluation.json").read_text())
    assert report["data"]["rows"] == 5 and "all rows" in report["data"]["source"]
    assert [(r["model"], r["quant"]) for r in report["results"]] == [("base", "nf4"), ("base+adapter", "nf4")]


def test_bad_arguments_exit_2_with_the_fix(trained_run, cache_dir, tmp_path):
    cases = [
        ([f"adapter={trained_run}", "quant.mode=nf4,nf5"], "list distinct modes out of"),
        ([f"adapter={trained_run}", "batch_size=0"], "give a positive integer"),
        ([f"adapter={trained_run}", "model.name_or_path=gpt2"], "drop the model.* overrides"),
        ([f"adapter={tmp_path / 'missing'}"], "does not exist"),
        (["data.max_lenght=8", f"adapter={trained_run}"], "did you mean 'data.max_length'"),
        (["model.name_or_path=gpt2"], "pass data.path="),
        ([f"adapter={trained_run}", f"data.path={tmp_path / 'none.jsonl'}"], "does not exist"),
    ]
    for args, said in cases:
        done = evaluate(cache_dir, *args)
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr[-2000:])
        assert "Loading" not in done.stderr  # refused before any weights load


def test_tasks_without_lm_eval_say_how_to_install_it(trained_run, cache_dir):
    # lm_eval hidden from this process as if it were not installed: the real CLI code path otherwise.
    code = ("import sys; sys.modules['lm_eval'] = None; from finetune.evaluate import main; "
            f"sys.exit(main(['adapter={trained_run}', 'tasks=finetune_tiny_mc']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(cache_dir), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "pip install 'finetune[eval]'" in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install '.[eval]')")
def test_lm_eval_runs_a_local_task_on_the_quantized_base_and_adapter(trained_run, cache_dir, tmp_path):
    out = tmp_path / "tasks.json"
    env_args = ["tasks=finetune_tiny_mc", f"task_path={TASKS}", "limit=10", f"out={out}"]
    # The local task loads through the `json` builder with the datasets hub switched off.
    done = subprocess.run([sys.executable, "-m", "finetune.evaluate", f"adapter={trained_run}", *env_args], cwd=ROOT,
                          env={**cli_env(cache_dir), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) == {"base", "base+adapter"}
    for results in tasks.values():
        acc = results["finetune_tiny_mc"]["acc"]
        assert 0.0 <= acc <= 1.0 and acc * 10 == pytest.approx(round(acc * 10))  # k of the 10 questions
    assert "finetune_tiny_mc" in done.stdout

    unknown = run_cli([f"adapter={trained_run}", "tasks=no_such_task", f"task_path={TASKS}"], cache_dir,
                      module="finetune.evaluate")
    assert unknown.returncode == 2 and "lm-eval knows no task no_such_task" in unknown.stderr
