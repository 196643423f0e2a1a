"""Training state you can resume from exactly: save, find, verify and restore checkpoints.

A checkpoint (`checkpoints/step-000050/`) holds everything a run needs to go on as if it had never
stopped: the adapter (a standalone PEFT adapter folder with its own manifest), the optimizer, LR
scheduler and gradient scaler states, every process's RNG states, the data position, the step and
the run's counters, and the fingerprint of what the state was trained on. It is written like every
folder here (finetune.atomic): complete, or not at all.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from finetune.adapter import write_adapter_files
from finetune.atomic import (
    MANIFEST,
    CheckpointError,
    commit_directory,
    disk_errors,
    read_torch,
    remove_stale_staging,
    staging_name,
    verify_directory,
    write_json_atomic,
    write_manifest,
    write_torch,
)
from finetune.config import Config
from finetune.fingerprint import differences

CHECKPOINT_KIND = "finetune-checkpoint"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """The run's position and counters; saved in every checkpoint as trainer_state.json."""

    step: int = 0  # optimizer steps done, skipped non-finite steps included
    tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    losses: list = field(default_factory=list)  # [step, loss] of every applied step
    evals: list = field(default_factory=list)  # [step, eval loss]
    samples_before: list = field(default_factory=list)  # the untrained adapter's samples, shown at the end
    history: list = field(default_factory=list)  # [step, {lr, tokens_per_s, objective metrics}] of applied steps


SHARDED = "sharded"  # FSDP: the LoRA weights and optimizer state, one file per rank (torch.distributed.checkpoint)


def _shard_file(rank: int) -> str:
    return f"{SHARDED}/__{rank}_0.distcp"  # the file name DCP's default planner gives each rank


def _sharded_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen base is not training state (it is rebuilt from the base model); strict=False
    # because the model's state then lacks the base's keys.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded_state(folder: Path, model, optimizer) -> None:
    """Every rank writes its shard of the LoRA weights and optimizer state into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer.optimizer, options=_sharded_state_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded_state(folder: Path, model, optimizer) -> None:
    """Every rank reads its shard of the LoRA weights and optimizer state back (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer.optimizer, options=_sharded_state_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_sharded_state_options())


def missing_shards(folder: Path, world_size: int) -> list[str]:
    """The files of a sharded state that are not in `folder`: DCP's metadata and every rank's shard."""
    return [name for name in [f"{SHARDED}/.metadata", *(_shard_file(r) for r in range(world_size))]
            if not (folder / name).is_file()]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:03d}.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch (CPU) and every CUDA device."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # As a tensor, so that the file loads with weights_only=True (no pickled numpy objects).
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(
    run_dir: Path, state: TrainState, *, accelerator, model, optimizer, scheduler, sampler,
    manifest: dict[str, Any], keep_last: int,
) -> Path:
    """Save the full training state as checkpoints/step-N atomically, then drop all but the `keep_last` newest.

    Every process writes its own RNG states into the staging folder; the main process writes the
    rest and the manifest, and renames it. With several processes the run folder must be on a
    filesystem they share. Under DDP the optimizer state is the main process's (every process holds
    the same one). Under FSDP every rank writes its shard of the LoRA weights and optimizer state
    (torch.distributed.checkpoint); the main process commits the folder only once it has found
    every rank's shard, so a checkpoint is complete or absent as with one process.
    """
    from accelerate.utils import broadcast_object_list

    from finetune.distributed import full_adapter_state, is_fsdp

    final = checkpoint_dir(run_dir, state.step)
    is_main = accelerator.is_main_process
    # The main process names the staging folder (unique to this writer) and tells the others.
    staging = [staging_name(final) if is_main else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(staging, from_process=0)
    staging = Path(staging[0])
    with disk_errors(f"the checkpoint of step {state.step}", final):
        if is_main:
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_torch(staging / _rng_file(accelerator.process_index), rng_state())
        fsdp = is_fsdp(accelerator)
        adapter_state = full_adapter_state(accelerator, model)  # under FSDP a collective
        if fsdp:
            save_sharded_state(staging / SHARDED, model, optimizer)
        accelerator.wait_for_everyone()
        if is_main:
            try:
                missing = missing_shards(staging, accelerator.num_processes) if fsdp else []
                if missing:
                    raise CheckpointError(f"the sharded state of step {state.step} is incomplete (no {missing[0]}): "
                                          "a rank's write was lost; the checkpoint is not committed")
                (staging / "adapter").mkdir()
                write_adapter_files(accelerator.unwrap_model(model), staging / "adapter", trained=False,
                                    state_dict=adapter_state)
                write_manifest(staging / "adapter", manifest)  # a standalone adapter, loadable by itself
                if not fsdp:
                    write_torch(staging / "optimizer.pt", optimizer.state_dict())
                write_torch(staging / "scheduler.pt", scheduler.state_dict())
                if accelerator.scaler is not None:
                    write_torch(staging / "scaler.pt", accelerator.scaler.state_dict())
                write_json_atomic(staging / TRAINER_STATE, {
                    **asdict(state), "sampler": sampler.state_dict(),
                    "world_size": accelerator.num_processes, "batch_size": sampler.batch_size,
                    "strategy": "fsdp" if fsdp else "ddp",
                })
                commit_directory(staging, final, {**manifest, "kind": CHECKPOINT_KIND, "step": state.step})
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            rotate_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoints/step-N folder, newest first; staging leftovers are not listed."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems with a checkpoint folder; empty when it is complete and can be resumed from."""
    problems = verify_directory(folder)
    if problems:
        return problems
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("kind") != CHECKPOINT_KIND:
        return [f"{folder} is a {manifest.get('kind', 'folder')}, not a training checkpoint "
                "(an adapter holds no optimizer or data state): pass a checkpoints/step-N folder"]
    optimizer = f"{SHARDED}/.metadata" if f"{SHARDED}/.metadata" in manifest["files"] else "optimizer.pt"
    required = [TRAINER_STATE, optimizer, "scheduler.pt", "adapter/adapter_model.safetensors", _rng_file(0)]
    return [f"{folder / name} is missing" for name in required if name not in manifest["files"]]


def find_latest_complete(run_dir: Path, verify: Optional[Callable[[Path], list[str]]] = None
                         ) -> tuple[Optional[Path], list[str]]:
    """The newest complete checkpoint of a run (or None), and why each newer folder was passed over.

    `verify` (default verify_checkpoint) lets a caller that asks several times keep the answers.
    """
    verify = verify or verify_checkpoint
    passed_over = []
    for _, folder in _step_dirs(run_dir):
        problems = verify(folder)
        if not problems:
            return folder, passed_over
        passed_over.append(f"{folder.name}: {problems[0]}")
    return None, passed_over


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints; remove older ones and leftovers of dead writers."""
    kept = 0
    for _, folder in _step_dirs(run_dir):
        if kept >= keep_last:
            shutil.rmtree(folder, ignore_errors=True)
        elif not verify_checkpoint(folder):
            kept += 1
    remove_stale_staging(run_dir / "checkpoints")


def resolve_resume(resume: str, run_dir: Path, verify: Optional[Callable[[Path], list[str]]] = None) -> Path:
    """The checkpoint `train.resume` names: `auto` (the latest complete one of `run_dir`) or a path.

    `verify` as in find_latest_complete.
    """
    verify = verify or verify_checkpoint
    if resume == "auto":
        folder, passed_over = find_latest_complete(run_dir, verify)
        if folder is None:
            why = "".join(f"\n    passed over {line}" for line in passed_over)
            raise CheckpointError(
                f"train.resume=auto: {run_dir / 'checkpoints'} holds no complete checkpoint to resume from{why}\n"
                "  Start a new run without train.resume, or point train.resume at a checkpoints/step-N folder"
            )
        return folder
    path = Path(resume).expanduser()
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
        return resolve_resume("auto", path, verify)  # a run folder: its latest complete checkpoint
    problems = verify(path)
    if problems:
        raise CheckpointError(f"train.resume={resume}: cannot resume from it:\n    " + "\n    ".join(problems))
    return path


def check_resumable(checkpoint: Path, fingerprint: dict[str, str], cfg: Config, world_size: int,
                    fsdp: bool = False) -> list[str]:
    """Refuse a checkpoint trained on something else; return notes on training settings that changed.

    Base model, quantization, LoRA, tokenizer and data must be the same (by fingerprint), and the
    global batch layout too (the data position is counted in batches). train.* and speed.*
    settings and model.attn_implementation may change (more steps, another learning rate); the
    run then differs from an uninterrupted one, and the notes say so.
    """
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    saved_train = manifest["config"]["train"]
    problems = differences(manifest.get("fingerprint", {}), manifest["config"], fingerprint, cfg)
    if state["batch_size"] != cfg.train.batch_size or state["world_size"] != world_size:
        problems.append(
            f"the batch layout changed (train.batch_size {state['batch_size']} -> {cfg.train.batch_size}, processes "
            f"{state['world_size']} -> {world_size}): the saved data position counts batches of the old layout"
        )
    saved_strategy = state.get("strategy", "ddp")
    if saved_strategy != ("fsdp" if fsdp else "ddp"):
        problems.append(f"the checkpoint's optimizer state was saved {'sharded by FSDP' if saved_strategy == 'fsdp' else 'whole'}"
                        f", but this run {'shards it (FSDP)' if fsdp else 'keeps it whole'}: resume with "
                        f"dist.strategy={saved_strategy}")
    if saved_train["optimizer"] != cfg.train.optimizer:
        problems.append(f"train.optimizer changed ({saved_train['optimizer']} -> {cfg.train.optimizer}): "
                        "the saved optimizer state is for the old one")
    if problems:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it was trained on something else:\n  - " + "\n  - ".join(problems)
            + "\n  Resume with the settings it was trained with, or start a new run in another output_dir"
        )
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    ignored = ("resume", "stop_after_steps", "keep_last", "save_every", "eval_every", "log_every")
    changeable = [(group, k) for group in ("train", "speed") for k in now.get(group, {}) if k not in ignored]
    changeable.append(("model", "attn_implementation"))  # another kernel: other rounding, same model
    saved = manifest["config"]
    return [f"{group}.{k}: {saved.get(group, {}).get(k)!r} -> {now[group][k]!r}"
            for group, k in changeable if saved.get(group, {}).get(k) != now[group][k]]


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice (fused, foreach, capturable).

    torch's load_state_dict takes those flags from the file: a checkpoint written on the CPU, or
    before fused AdamW, would quietly turn this run's fused kernel off. With the run's flags in
    place, torch also moves each `step` to the device the fused kernel needs.
    """
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        for flag in ("fused", "foreach", "capturable"):
            if flag in group:
                saved_group[flag] = group[flag]
    optimizer.load_state_dict(saved)


def load_checkpoint(checkpoint: Path, *, accelerator, model, optimizer, scheduler, sampler) -> TrainState:
    """Load the adapter, optimizer, scheduler, scaler and data position; return the run's counters.

    RNG states are restored separately (`restore_rng`), right before the first resumed step.
    """
    from peft.utils import set_peft_model_state_dict

    from finetune.distributed import is_fsdp

    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if is_fsdp(accelerator):
        load_sharded_state(checkpoint / SHARDED, model, optimizer)
    else:
        weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        if result.unexpected_keys:
            raise CheckpointError(f"{checkpoint} has adapter tensors this model lacks, e.g. {result.unexpected_keys[0]}")
        load_optimizer_state(optimizer, read_torch(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(read_torch(checkpoint / "scheduler.pt"))
    if accelerator.scaler is not None:
        if not (checkpoint / "scaler.pt").exists():
            raise CheckpointError(f"{checkpoint} has no gradient scaler state: it was not trained in fp16; "
                                  "resume with the mixed precision it was trained with")
        accelerator.scaler.load_state_dict(read_torch(checkpoint / "scaler.pt"))
    sampler.load_state_dict(state["sampler"])
    return TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__ if k in state})


def restore_rng(checkpoint: Path, rank: int) -> None:
    """Put this process's RNG states back to what they were after the checkpoint's step."""
    path = checkpoint / _rng_file(rank)
    if not path.exists():
        raise CheckpointError(f"{checkpoint} has no RNG states for process {rank}: it was saved by fewer processes")
    set_rng_state(read_torch(path))
