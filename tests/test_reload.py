"""Adapters saved by a run load back onto a freshly quantized base and compute the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.adapter import load_adapter
from finetune.atomic import CheckpointError
from finetune.run import compose, run
from tests.conftest import tiny_run_args


def test_reloaded_adapter_gives_the_trained_models_logits(tiny_llama, instruction_file, cache_dir, tmp_path,
                                                         fresh_accelerate_state, tokenizer):
    out = tmp_path / "run"
    cfg = compose(tiny_run_args(tiny_llama, instruction_file, out, "train.max_steps=4", "lora.dropout=0.0"))
    result = run(cfg, out, cache_dir=cache_dir)
    trained = result.model.eval()
    batch = tokenizer(["What is 3 plus 4?", "The quick brown fox"], return_tensors="pt", padding=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = trained(**batch).logits.float()
        with trained.disable_adapter():
            base_logits = trained(**batch).logits.float()
    # training moved the adapter: with and without it differ
    assert (expected - base_logits).abs().max() > 1e-3

    reloaded, _, saved_cfg = load_adapter(out, cache_dir=cache_dir)
    assert saved_cfg.lora.r == cfg.lora.r and saved_cfg.model.name_or_path == str(tiny_llama)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = reloaded(**batch).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_truncated_adapter_is_refused(tiny_llama, instruction_file, cache_dir, tmp_path, fresh_accelerate_state):
    out = tmp_path / "run"
    run(compose(tiny_run_args(tiny_llama, instruction_file, out, "train.max_steps=1")), out, cache_dir=cache_dir)
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_adapter(out, cache_dir=cache_dir)
    manifest = json.loads((out / "adapter" / "finetune_manifest.json").read_text())
    assert manifest["base_model"] == str(tiny_llama) and manifest["quant"]["mode"] == "nf4"
