"""A run folder's record survives refused launches, leftovers of killed saves are cleaned, and resume says what it chose."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from finetune.atomic import verify_directory
from tests.conftest import run_cli, tiny_run_args


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: the folder's record, byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_llama, instruction_file, cache_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_run_args(tiny_llama, instruction_file, out, "train.save_every=1")
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args


def test_a_refused_launch_leaves_the_finished_runs_record_as_it_was(finished, cache_dir):
    out, args = finished
    before = snapshot(out)
    assert "config.json" in before and not any(name.startswith(".hydra") for name in before)
    # Other settings into a finished run: refused by the preflight (no resume) ...
    refused = run_cli([*args, "lora.r=8", "train.lr=1e-3"], cache_dir)
    assert refused.returncode == 2 and "already holds a finished run" in refused.stderr, refused.stderr[-2000:]
    # ... and, asked to resume, refused once the checkpoint's LoRA settings are compared.
    refused = run_cli([*args, "lora.r=8", "train.resume=auto", "train.max_steps=5"], cache_dir)
    assert refused.returncode == 2 and "the LoRA settings changed" in refused.stderr, refused.stderr[-2000:]
    assert snapshot(out) == before
    assert json.loads((out / "config.json").read_text())["lora"]["r"] != 8


def test_leftovers_of_a_killed_save_are_removed_when_the_next_launch_is_accepted(finished, cache_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    # What a kill -9 during the final adapter write and during a checkpoint leaves behind (pids of no process).
    leftovers = [out / ".adapter.tmp-999999999-0badf00d", out / "checkpoints" / ".step-000004.tmp-999999999-feedbeef",
                 out / "checkpoints" / ".step-000004.tmp-save"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in finished[1]]
    result = run_cli([*args, "train.resume=auto", "train.max_steps=4"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in leftovers:
        assert not folder.exists()
        assert f"removed {folder}, left by an interrupted save" in result.stdout
    assert not verify_directory(out / "adapter")


def test_resume_auto_names_the_corrupt_checkpoint_it_skipped(finished, cache_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "adapter")  # an interrupted run: checkpoints only
    newest = out / "checkpoints" / "step-000003"
    with open(newest / "optimizer.pt", "ab") as f:
        f.write(b"garbage")
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in finished[1]]
    result = run_cli([*args, "train.resume=auto"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.resume=auto: skipped step-000003: " in result.stdout
    assert "optimizer.pt has" in result.stdout and "resuming from step-000002 instead" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000002") and summary["steps"] == 3


def test_a_finished_run_with_a_damaged_adapter_is_repaired_by_resume_auto(finished, cache_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    weights = out / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # a flipped tail: the checksum no longer matches
    weights.write_bytes(bytes(data))
    assert verify_directory(out / "adapter")
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in finished[1]]
    result = run_cli([*args, "train.resume=auto"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the final adapter of" in result.stdout and "is damaged" in result.stdout
    assert "writing it again from step-000003" in result.stdout
    assert not verify_directory(out / "adapter")
    original = snapshot(finished[0] / "adapter")
    assert snapshot(out / "adapter")["adapter_model.safetensors"] == original["adapter_model.safetensors"]
