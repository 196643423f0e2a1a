"""Exact resume: a run stopped at step k and resumed gives the loss of an uninterrupted run at every step.

Everything runs the real CLI on a tiny llama with real bitsandbytes 4-bit layers, on the CPU, where
the comparison is bitwise. LoRA dropout is on, so a resume that did not restore the torch RNG would
draw other dropout masks and differ; grad_accum=2 makes every step span two micro-batches.
The data gives 8 batches of 4 per epoch, so 4 steps per epoch: step 2 is mid-epoch, step 4 ends
the first epoch exactly, and step 5 is the first step after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from finetune.checkpoint import find_latest_complete, verify_checkpoint
from tests.conftest import LiveCli, run_cli, tiny_run_args

MAX_STEPS = 12


@pytest.fixture(scope="module")
def data_40(tmp_path_factory) -> Path:
    # 40 rows: data.eval_fraction=0.2 holds out 8, leaving 32 = 8 batches of 4.
    path = tmp_path_factory.mktemp("resume_data") / "sums40.jsonl"
    rows = [{"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(8) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def resume_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(model, data, out, f"train.max_steps={MAX_STEPS}", "lora.dropout=0.1",
                         "train.eval_every=5", "train.lr=1e-3", *extra)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def finished(result, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return summary(out)


@pytest.fixture(scope="module")
def reference(tiny_llama, data_40, cache_dir, tmp_path_factory) -> dict:
    """An uninterrupted run: the losses every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(resume_args(tiny_llama, data_40, out), cache_dir)
    s = finished(result, out)
    s["adapter_bytes"] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    return s


def assert_same_run(got: dict, out: Path, reference: dict) -> None:
    assert [step for step, _ in got["losses"]] == list(range(1, MAX_STEPS + 1))
    # Bitwise: the floats themselves, not a tolerance.
    assert got["losses"] == reference["losses"]
    assert got["eval_loss"] == reference["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference["adapter_bytes"]


def test_an_uninterrupted_run_is_itself_deterministic(reference, tiny_llama, data_40, cache_dir, tmp_path):
    # Before blaming resume for a difference: the same run twice gives the same losses, bit for bit.
    out = tmp_path / "again"
    again = finished(run_cli(resume_args(tiny_llama, data_40, out), cache_dir), out)
    assert again["losses"] == reference["losses"]
    assert len({loss for _, loss in reference["losses"]}) == MAX_STEPS  # the losses really move


def test_stopped_and_resumed_runs_match_the_uninterrupted_one(reference, tiny_llama, data_40, cache_dir, tmp_path):
    # One run, stopped three times with train.stop_after_steps (a real, user-facing stop: checkpoint
    # and exit 0) and resumed each time: mid-epoch, exactly at the end of the first epoch, and
    # right after that epoch boundary.
    out = tmp_path / "run"
    stops = [  # (steps in this launch, the step it stops at, the data position saved there)
        (2, 2, {"epoch": 0, "batch_in_epoch": 4}),
        (2, 4, {"epoch": 0, "batch_in_epoch": 8}),
        (1, 5, {"epoch": 1, "batch_in_epoch": 2}),
    ]
    for launch, (steps, stop, position) in enumerate(stops):
        resume = ["train.resume=auto"] if launch else []
        result = run_cli(resume_args(tiny_llama, data_40, out, f"train.stop_after_steps={steps}", *resume), cache_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        assert f"stopped after train.stop_after_steps={steps} at step {stop} of {MAX_STEPS}" in result.stdout
        assert not (out / "adapter").exists() and not (out / "summary.json").exists()
        checkpoint = out / "checkpoints" / f"step-{stop:06d}"
        assert verify_checkpoint(checkpoint) == []
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert (state["step"], state["sampler"]) == (stop, position)
        assert state["losses"] == reference["losses"][:stop]

    last = run_cli(resume_args(tiny_llama, data_40, out, "train.resume=auto"), cache_dir)
    got = finished(last, out)
    assert f"resuming     from {checkpoint} (step 5 of {MAX_STEPS})" in last.stdout
    assert got["resumed_from"] == str(checkpoint)
    assert_same_run(got, out, reference)

    # Finished: the final state is checkpointed too, and a finished run is not trained again.
    assert find_latest_complete(out)[0] == out / "checkpoints" / f"step-{MAX_STEPS:06d}"
    done = run_cli(resume_args(tiny_llama, data_40, out, "train.resume=auto"), cache_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"already finished at step {MAX_STEPS}" in done.stderr and "raise train.max_steps" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_128_plus_signal(sig, reference, tiny_llama, data_40,
                                                                   cache_dir, tmp_path):
    out = tmp_path / "run"
    live = LiveCli(resume_args(tiny_llama, data_40, out), cache_dir)
    live.wait_until(lambda: live.steps_done() >= 2)
    live.process.send_signal(sig)
    assert live.wait() == 128 + sig, live.stderr[-4000:]
    assert "Traceback" not in live.stderr
    assert f"{sig.name} received; finishing this step and saving a checkpoint" in live.stderr
    assert f"stopped by {sig.name} at step" in live.stdout
    checkpoint, _ = find_latest_complete(out)
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 2 <= stopped_at < MAX_STEPS
    assert not (out / "adapter").exists()
    if sig == signal.SIGINT:
        return  # the checkpoint is the same kind as SIGTERM's, whose resume is compared below

    got = finished(run_cli(resume_args(tiny_llama, data_40, out, "train.resume=auto"), cache_dir), out)
    assert got["resumed_from"] == str(checkpoint)
    assert_same_run(got, out, reference)


def test_sigkill_inside_an_accumulation_window_redoes_that_step(reference, tiny_llama, data_40, cache_dir, tmp_path):
    # A checkpoint after every step; the kill lands while the next step's micro-batches are running
    # (the saves take a few milliseconds of each ~100 ms step). That half-done step is lost, and the
    # resumed run must redo it from the same micro-batches and dropout masks.
    out = tmp_path / "run"
    live = LiveCli(resume_args(tiny_llama, data_40, out, "train.save_every=1"), cache_dir)
    live.wait_until(lambda: (out / "checkpoints" / "step-000003").exists())
    time.sleep(0.03)
    live.process.kill()
    assert live.wait() == -signal.SIGKILL
    checkpoint, _ = find_latest_complete(out)
    assert checkpoint is not None and int(checkpoint.name.removeprefix("step-")) < MAX_STEPS

    got = finished(run_cli(resume_args(tiny_llama, data_40, out, "train.save_every=1", "train.resume=auto"),
                           cache_dir), out)
    assert got["resumed_from"] == str(checkpoint)
    assert_same_run(got, out, reference)


def test_sigkill_during_saves_never_leaves_a_checkpoint_that_is_chosen(reference, tiny_llama, data_40, cache_dir,
                                                                      tmp_path):
    # Kill the process the moment a save has begun (its staging folder appears), several times over.
    # Whatever the moment, every step-N folder is complete, leftovers are ignored, and the run resumes
    # to exactly the uninterrupted result.
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    killed_mid_save = 0
    for attempt in range(3):
        args = resume_args(tiny_llama, data_40, out, "train.save_every=1", *(["train.resume=auto"] if attempt else []))
        live = LiveCli(args, cache_dir)

        def saving() -> bool:
            # After the first complete checkpoint, so that there is always one to resume from.
            names = os.listdir(checkpoints) if checkpoints.is_dir() else []
            return any(n.startswith("step-") for n in names) and any(".tmp-" in n for n in names)

        live.wait_until(saving)
        live.process.kill()
        assert live.wait() == -signal.SIGKILL
        leftovers = [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]
        killed_mid_save += bool(leftovers)
        for folder in checkpoints.glob("step-*"):
            assert verify_checkpoint(folder) == [], folder  # a rename is atomic: never a half folder
        latest, _ = find_latest_complete(out)
        assert latest is not None
    assert killed_mid_save >= 1, "no kill landed inside a save; the test did not test anything"

    got = finished(run_cli(resume_args(tiny_llama, data_40, out, "train.save_every=1", "train.resume=auto"),
                           cache_dir), out)
    assert_same_run(got, out, reference)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "staging leftovers were not cleaned"
    assert len(list(checkpoints.glob("step-*"))) == 2  # train.keep_last=2


@pytest.fixture(scope="module")
def interrupted(tiny_llama, data_40, cache_dir, tmp_path_factory) -> Path:
    """A run stopped at step 6 with checkpoints at steps 2, 4 and 6 (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    result = run_cli(resume_args(tiny_llama, data_40, out, "train.save_every=2", "train.keep_last=3",
                                 "train.stop_after_steps=6"), cache_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_a_truncated_or_incomplete_checkpoint_is_never_chosen(interrupted, reference, tiny_llama, data_40,
                                                              cache_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    optimizer = out / "checkpoints" / "step-000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    (out / "checkpoints" / "step-000004" / "rng-rank000.pt").unlink()
    latest, passed_over = find_latest_complete(out)
    assert latest == out / "checkpoints" / "step-000002"
    assert "truncated" in passed_over[0] and "missing" in passed_over[1]

    named = run_cli(resume_args(tiny_llama, data_40, out, f"train.resume={out}/checkpoints/step-000006"), cache_dir)
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert "optimizer.pt has" in named.stderr and "(truncated?)" in named.stderr

    got = finished(run_cli(resume_args(tiny_llama, data_40, out, "train.resume=auto"), cache_dir), out)
    assert got["resumed_from"] == str(latest)
    assert_same_run(got, out, reference)


def test_resume_refuses_another_base_lora_targets_or_dataset(interrupted, tiny_bloom, tiny_llama, data_40,
                                                             instruction_file, cache_dir, tmp_path):
    checkpoint = interrupted / "checkpoints" / "step-000006"
    changed = run_cli(resume_args(tiny_bloom, instruction_file, tmp_path / "a", f"train.resume={checkpoint}",
                                  "lora.target_modules=[dense]"), cache_dir)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    err = changed.stderr
    assert f"cannot resume from {checkpoint}: it was trained on something else" in err
    assert f"the base model changed (model.name_or_path: '{tiny_llama}' -> '{tiny_bloom}')" in err
    assert "the LoRA settings changed (lora.target_modules: ['all-linear'] -> ['dense'])" in err
    assert f"the data changed (data.path: '{data_40}' -> '{instruction_file}')" in err

    # The same path, other content: caught by the hash of the tokenized rows, not by the name.
    data, run_dir = tmp_path / "sums40.jsonl", tmp_path / "b"
    shutil.copy(data_40, data)
    first = run_cli(resume_args(tiny_llama, data, run_dir, "train.stop_after_steps=1"), cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    data.write_text(data.read_text().replace('"output": "', '"output": "= '))  # every row
    edited = run_cli(resume_args(tiny_llama, data, run_dir, "train.resume=auto", "train.batch_size=2"), cache_dir)
    assert edited.returncode == 2 and "Traceback" not in edited.stderr
    assert "the data changed (same settings, different content on disk)" in edited.stderr
    assert "the batch layout changed (train.batch_size 4 -> 2" in edited.stderr


def test_resume_needs_a_checkpoint_and_an_interrupted_run_needs_resume(interrupted, tiny_llama, data_40, cache_dir, tmp_path):
    nothing = run_cli(resume_args(tiny_llama, data_40, tmp_path / "empty", "train.resume=auto"), cache_dir)
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr
    assert "holds no complete checkpoint to resume from" in nothing.stderr

    # An interrupted run is never silently restarted from scratch in its own folder.
    again = run_cli(resume_args(tiny_llama, data_40, interrupted), cache_dir)
    assert again.returncode == 2 and "holds the checkpoints of an interrupted run" in again.stderr
    assert "train.resume=auto" in again.stderr



@pytest.mark.parametrize("resume", ["auto", "run folder", "step-000004"])
def test_a_start_checksums_each_checkpoint_once(resume, interrupted, tiny_llama, data_40, cache_dir, tmp_path,
                                                monkeypatch, capsys):
    # Resolving the resume, checking it against the folder's latest and saying what was passed over
    # all read the same checkpoints; a large one costs a full read of every file per pass.
    import finetune.atomic
    from finetune.preflight import preflight
    from finetune.run import compose

    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    optimizer = out / "checkpoints" / "step-000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-1] + bytes([optimizer.read_bytes()[-1] ^ 1]))  # corrupt, same size
    hashed: list[Path] = []
    real_sha256 = finetune.atomic.sha256_file

    def counted(path: Path) -> str:
        hashed.append(Path(path))
        return real_sha256(path)

    monkeypatch.setattr(finetune.atomic, "sha256_file", counted)
    named = {"auto": "auto", "run folder": str(out), "step-000004": str(out / "checkpoints" / "step-000004")}[resume]
    cfg = compose(resume_args(tiny_llama, data_40, out, f"train.resume={named}"))
    _, resume_from = preflight(cfg, out, cache_dir)
    assert resume_from == out / "checkpoints" / "step-000004"
    assert any(p.parent.name == "step-000004" for p in hashed) and any(p == optimizer for p in hashed)
    twice = sorted({str(p) for p in hashed if hashed.count(p) > 1})
    assert twice == [], twice
    if resume != "step-000004":
        assert "skipped step-000006: " in capsys.readouterr().out


def test_adamw_is_fused_and_stays_fused_when_resumed_from_an_unfused_checkpoint():
    import copy

    import torch

    from finetune.checkpoint import load_optimizer_state
    from finetune.loop import build_optimizer
    from finetune.run import compose

    torch.manual_seed(0)
    grads = [torch.randn(4, 3) for _ in range(4)]

    def train(optimizer, param, grads):
        for g in grads:
            param.grad = g.clone()
            optimizer.step()

    # An unfused AdamW (as in a checkpoint from a run before fused AdamW): 2 steps, saved, 2 more.
    param = torch.nn.Parameter(torch.randn(4, 3))
    unfused = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.0, fused=False)
    train(unfused, param, grads[:2])
    saved, at_save = copy.deepcopy(unfused.state_dict()), param.detach().clone()
    train(unfused, param, grads[2:])

    resumed_param = torch.nn.Parameter(at_save)
    resumed = build_optimizer([resumed_param], compose(["output_dir=/tmp/unused", "train.optimizer=adamw",
                                                        "train.lr=1e-2", "train.weight_decay=0.0"]).train)
    assert resumed.param_groups[0]["fused"] is True
    load_optimizer_state(resumed, saved)
    assert resumed.param_groups[0]["fused"] is True  # the file said fused=False
    train(resumed, resumed_param, grads[2:])
    torch.testing.assert_close(resumed_param.detach(), param.detach(), rtol=1e-6, atol=1e-7)
