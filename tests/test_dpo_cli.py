"""DPO through the real CLI: from an SFT adapter (the reference), exact resume, a standard PEFT adapter out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, tiny_run_args

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"I think it is about {a * b + 7}."}
         for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


@pytest.fixture(scope="module")
def sft_run(tiny_llama, instruction_file, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "train.lr=1e-2"), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def dpo_args(tiny_llama, pairs_file, sft_run, out, *extra):
    return tiny_run_args(tiny_llama, pairs_file, out, "data.format=preference", "data.prompt_field=prompt",
                         "train.objective=dpo", "train.dpo_beta=0.5", f"lora.init_from={sft_run}", "lora.dropout=0.0",
                         "train.max_steps=4", "train.grad_accum=1", "train.lr=5e-3", "quant.compute_dtype=float32",
                         *extra)


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, pairs_file, sft_run, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = run_cli(dpo_args(tiny_llama, pairs_file, sft_run, out), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_dpo_from_an_sft_adapter_starts_at_log2_and_learns_the_preference(dpo_run):
    out, result = dpo_run
    summary = json.loads((out / "summary.json").read_text())
    losses = [loss for _, loss in summary["losses"]]
    # The policy starts as the reference (the SFT adapter), so every log ratio is 0: loss log(2).
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert losses[-1] < losses[0] - 0.05, losses
    metrics = [m for _, m in summary["history"]]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert metrics[-1]["rewards/margins"] > 0 and metrics[-1]["rewards/accuracies"] > 0.5
    assert "rewards      accuracy" in result.stdout
    # curves.png: loss, learning rate, tokens/s, and DPO's rewards, margin and accuracy panels (260 px each)
    png = (out / "curves.png").read_bytes()
    assert int.from_bytes(png[20:24], "big") == 6 * 260


def test_a_dpo_adapter_is_the_standard_peft_format_without_the_reference_copy(dpo_run, sft_run):
    out, _ = dpo_run
    files = sorted(p.name for p in (out / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "finetune_manifest.json"]
    trained, sft = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, sft_run))
    assert trained.keys() == sft.keys() and not any("reference" in k for k in trained)
    assert any(not torch.equal(trained[k], sft[k]) for k in trained)  # DPO moved the SFT adapter


def test_dpo_stopped_and_resumed_matches_the_uninterrupted_run(dpo_run, tiny_llama, pairs_file, sft_run, cache_dir,
                                                               tmp_path):
    reference = json.loads((dpo_run[0] / "summary.json").read_text())["losses"]
    out = tmp_path / "run"
    first = run_cli(dpo_args(tiny_llama, pairs_file, sft_run, out, "train.stop_after_steps=2"), cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(dpo_args(tiny_llama, pairs_file, sft_run, out, "train.resume=auto"), cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())["losses"]
    assert [s for s, _ in resumed] == [s for s, _ in reference]
    assert max(abs(a - b) for (_, a), (_, b) in zip(resumed, reference)) == 0.0


def test_changing_the_objective_of_a_run_is_refused_on_resume(dpo_run, tiny_llama, pairs_file, sft_run, cache_dir):
    out, _ = dpo_run
    result = run_cli(dpo_args(tiny_llama, pairs_file, sft_run, out, "train.dpo_beta=0.1", "train.resume=auto",
                              "train.max_steps=6"), cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the training objective changed (train.dpo_beta: 0.5 -> 0.1)" in result.stderr


def test_dpo_under_fsdp_on_two_ranks_matches_one_process(tiny_llama, pairs_file, sft_run, cache_dir, tmp_path):
    """DPO from an SFT adapter with FSDP2 on 2 gloo ranks: the reference pass (the frozen copy of the SFT
    adapter, switched in on the sharded model) and the policy's pass give the loss curve of one process
    with the same global batch, and the adapter saved is the standard one. Gradients are clipped
    (train.max_grad_norm=1): this test failed while the clipping read the parameters from before sharding."""
    from tests.test_distributed import FSDP, _losses, torchrun

    fsdp_out, one_out = tmp_path / "fsdp", tmp_path / "one"
    ranks = torchrun(dpo_args(tiny_llama, pairs_file, sft_run, fsdp_out, *FSDP, "train.batch_size=2"), cache_dir)
    assert ranks.returncode == 0, ranks.stdout[-3000:] + ranks.stderr[-5000:]
    assert "FSDP2" in ranks.stdout
    one = run_cli(dpo_args(tiny_llama, pairs_file, sft_run, one_out, "quant.quant_storage=bfloat16",
                           "train.batch_size=4"), cache_dir)
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp_losses, one_losses = _losses(fsdp_out), _losses(one_out)
    assert fsdp_losses[0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference
    assert fsdp_losses == pytest.approx(one_losses, rel=5e-3)
    assert fsdp_losses[-1] < fsdp_losses[0] - 0.05, fsdp_losses
    trained = load_file(str(fsdp_out / "adapter" / "adapter_model.safetensors"))
    assert trained.keys() == load_file(str(sft_run / "adapter" / "adapter_model.safetensors")).keys()
