"""Write adapters and checkpoints atomically; find, verify and restore them on the way back in.

A folder is written under a temporary name in the same parent, every file is flushed to disk,
a manifest listing each file's size and sha256 is written last, and only then is the folder
renamed into place. A reader trusts a folder only if its manifest exists and every file
matches it, so a crash, a kill or a full disk mid-save can never produce a folder that is chosen.

A checkpoint (`checkpoints/step-000050/`) holds everything a run needs to go on exactly as if it
had never stopped: the adapter (a standalone PEFT adapter folder with its own manifest), the
optimizer, LR scheduler and gradient scaler states, every process's RNG states, the data position,
the step and the run's counters, and the fingerprint of what the state was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune.config import Config

MANIFEST = "finetune_manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_KIND, CHECKPOINT_KIND = "finetune-adapter", "finetune-checkpoint"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A saved adapter or checkpoint is missing, incomplete, for another setup, or cannot be written."""


# ------------------------------------------------------------------------------------ atomic folders


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_torch(path: Path, obj: Any) -> None:
    """torch.save through memory, so a failed write raises OSError (torch's own writer raises RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def _read_torch(path: Path) -> Any:
    # weights_only: every state file holds only tensors and plain containers (RNG states included:
    # rng_state() stores numpy's as a tensor), so nothing in a checkpoint can run code when loaded.
    return torch.load(path, map_location="cpu", weights_only=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Record every file of `folder` (size and sha256) in its manifest; call it last."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / MANIFEST
    }
    write_json_atomic(folder / MANIFEST, {**manifest, "files": files})


def _commit(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, flush everything, and rename `staging` to `final` (replacing it last)."""
    write_manifest(staging, manifest)
    _fsync_tree(staging)
    if final.exists():
        # Move the old folder aside first; it is deleted only once the new one is in place.
        retired = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_directory(final: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder; on success record its files in a manifest and rename it to `final`.

    On any exception the temporary folder is removed and whatever was at `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _commit(staging, final, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def disk_errors(what: str, where: Path) -> Iterator[None]:
    """Turn a failed write (full disk, file too large, no permission) into a message that says what survived."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            f"could not write {what} to {where}: {e}. Nothing that was already saved was touched "
            "(folders are replaced only once complete). Free disk space or fix the folder's permissions, "
            "then resume with train.resume=auto"
        ) from e


def verify_directory(folder: Path) -> list[str]:
    """Problems with a folder written by `atomic_directory`; empty when it is complete."""
    if not folder.is_dir():
        return [f"{folder} does not exist or is not a folder"]
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return [f"{folder} has no {MANIFEST}: it was not written completely by finetune"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{manifest_path} is corrupt: {e}"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return [f"{manifest_path} lists no files: it was not written by finetune"]
    problems = []
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{path} does not match its checksum in the manifest (corrupt)")
    return problems


# ------------------------------------------------------------------------------------------- adapters


def adapter_manifest(cfg: Config, *, source: str, step: int, fingerprint: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """What an adapter needs to be loaded back onto the right base, and checked against it."""
    return {
        "kind": ADAPTER_KIND,
        "step": step,
        "base_model": cfg.model.name_or_path,
        "base_source": source,
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "quant": OmegaConf.to_container(OmegaConf.structured(cfg.quant)),
        "fingerprint": fingerprint or {},
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }


def check_saved_adapter(model, folder: Path, *, trained: bool) -> None:
    """The adapter file in `folder` holds every LoRA tensor of `model`, all finite, and (if `trained`)
    no LoRA B all zero.

    LoRA B starts at zero, so a B still all zero after training means its layer never learned (no
    gradient reached it, or every step was skipped): such an adapter is refused, not saved.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = set(get_peft_model_state_dict(model))
    # Counted independently of PEFT's own key list: every LoRA layer must have an A and a B.
    n_layers = sum(len(m.lora_A) for m in model.modules() if isinstance(m, LoraLayer))
    lora_keys = [k for k in saved if ".lora_A." in k or ".lora_B." in k]
    problems = []
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        problems.append(f"the saved tensors differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    if len(lora_keys) != 2 * n_layers:
        problems.append(f"the model has {n_layers} LoRA layers but {len(lora_keys)} LoRA tensors were saved "
                        f"(expected {2 * n_layers})")
    nonfinite = [k for k, v in saved.items() if not torch.isfinite(v).all()]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or inf, e.g. {nonfinite[0]}: the training diverged; "
                        "lower train.lr or keep train.max_grad_norm > 0")
    zero = [k for k in lora_keys if ".lora_B." in k and not saved[k].any()]
    if trained and zero:
        problems.append(f"{len(zero)} of {len(lora_keys) // 2} LoRA B matrices are still all zero after training, "
                        f"e.g. {zero[0]}: those layers never learned (every step skipped, a train.lr too small to "
                        "move them, or no gradient reached them)")
    if problems:
        raise CheckpointError("refusing to save a broken adapter:\n  - " + "\n  - ".join(problems))


def _write_adapter_files(model, folder: Path, *, trained: bool) -> None:
    """PEFT's standard adapter files (never the base weights) into `folder`, checked after writing."""
    model.save_pretrained(str(folder), safe_serialization=True)
    missing = [f for f in ADAPTER_FILES if not (folder / f).exists()]
    if missing:
        raise CheckpointError(f"PEFT did not write {missing} into {folder}")
    check_saved_adapter(model, folder, trained=trained)


def save_adapter(model, final: Path, manifest: dict[str, Any], *, trained: bool = True) -> Path:
    """Save the adapter atomically; `trained` also refuses LoRA B matrices that never left zero."""
    with disk_errors("the adapter", final), atomic_directory(final, manifest) as tmp:
        _write_adapter_files(model, tmp, trained=trained)
    return final


@dataclass
class AdapterManifest:
    path: Path
    data: dict[str, Any]

    @property
    def config(self) -> Config:
        schema = OmegaConf.structured(Config)
        return OmegaConf.to_object(OmegaConf.merge(schema, self.data["config"]))


def resolve_adapter_dir(path: Path) -> Path:
    """A run folder means its final adapter; an adapter or checkpoint folder means itself."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run folder or an adapter folder written by finetune")
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise CheckpointError(
        f"{path} holds no adapter (no adapter_config.json in it or in {path / 'adapter'}); "
        "pass the run folder printed at the end of training"
    )


def read_adapter_manifest(adapter_dir: Path) -> AdapterManifest:
    """The manifest of a complete adapter whose base is still the model it was trained on."""
    problems = verify_directory(adapter_dir)
    if problems:
        raise CheckpointError(f"the adapter at {adapter_dir} cannot be trusted:\n  " + "\n  ".join(problems))
    data = json.loads((adapter_dir / MANIFEST).read_text())
    missing = [k for k in ("base_model", "base_source", "tokenizer", "quant", "config") if k not in data]
    if missing:
        raise CheckpointError(f"the manifest of {adapter_dir} lacks {missing}: it was not written by this finetune")
    manifest = AdapterManifest(adapter_dir, data)
    check_adapter_base(manifest)
    return manifest


def check_adapter_base(manifest: AdapterManifest) -> None:
    """Refuse an adapter whose base folder now holds another model than the one it was trained on.

    Checked where the base is a local folder (bases from the hub are pinned by name and revision);
    a base that has moved away is not checked here: loading it fails with its own message.
    """
    from finetune.fingerprint import base_fingerprint

    recorded = manifest.data.get("fingerprint", {}).get("base")
    source = manifest.data["base_source"]
    if not recorded or not (Path(source) / "config.json").is_file():
        return
    try:
        current = base_fingerprint(manifest.config, source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the base model at {source} (which {manifest.path} was trained on) cannot be read: {e}") from e
    if current != recorded:
        raise CheckpointError(
            f"the adapter at {manifest.path} was trained on the base model at {source}, but that folder now holds a "
            "different model (its config or weights changed): an adapter only works on the base it was trained on. "
            f"Restore that base, or train an adapter for the new one"
        )


# ------------------------------------------------------------------------------------ training state


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
    filesystem they share. The optimizer state is the main process's: under DDP every process holds
    the same one (sharded optimizers, FSDP or DeepSpeed ZeRO, are not supported here).
    """
    final = checkpoint_dir(run_dir, state.step)
    # A name every process can compute without talking; the leftover of a killed save is replaced.
    staging = final.with_name(f".{final.name}.tmp-save")
    is_main = accelerator.is_main_process
    with disk_errors(f"the checkpoint of step {state.step}", final):
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _write_torch(staging / _rng_file(accelerator.process_index), rng_state())
        accelerator.wait_for_everyone()
        if is_main:
            try:
                (staging / "adapter").mkdir()
                _write_adapter_files(accelerator.unwrap_model(model), staging / "adapter", trained=False)
                write_manifest(staging / "adapter", manifest)  # a standalone adapter, loadable by itself
                _write_torch(staging / "optimizer.pt", optimizer.state_dict())
                _write_torch(staging / "scheduler.pt", scheduler.state_dict())
                if accelerator.scaler is not None:
                    _write_torch(staging / "scaler.pt", accelerator.scaler.state_dict())
                write_json_atomic(staging / TRAINER_STATE, {
                    **asdict(state), "sampler": sampler.state_dict(),
                    "world_size": accelerator.num_processes, "batch_size": sampler.batch_size,
                })
                _commit(staging, final, {**manifest, "kind": CHECKPOINT_KIND, "step": state.step})
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
    required = [TRAINER_STATE, "optimizer.pt", "scheduler.pt", "adapter/adapter_model.safetensors", _rng_file(0)]
    return [f"{folder / name} is missing" for name in required if name not in manifest["files"]]


def find_latest_complete(run_dir: Path) -> tuple[Optional[Path], list[str]]:
    """The newest complete checkpoint of a run (or None), and why each newer folder was passed over."""
    passed_over = []
    for _, folder in _step_dirs(run_dir):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder, passed_over
        passed_over.append(f"{folder.name}: {problems[0]}")
    return None, passed_over


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints; remove older ones and leftovers of killed saves."""
    kept = 0
    for _, folder in _step_dirs(run_dir):
        if kept >= keep_last:
            shutil.rmtree(folder, ignore_errors=True)
        elif not verify_checkpoint(folder):
            kept += 1
    for leftover in (run_dir / "checkpoints").glob(".step-*"):
        if ".tmp-" in leftover.name or ".old-" in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint `train.resume` names: `auto` (the latest complete one of `run_dir`) or a path."""
    if resume == "auto":
        folder, passed_over = find_latest_complete(run_dir)
        if folder is None:
            why = "".join(f"\n    passed over {line}" for line in passed_over)
            raise CheckpointError(
                f"train.resume=auto: {run_dir / 'checkpoints'} holds no complete checkpoint to resume from{why}\n"
                "  Start a new run without train.resume, or point train.resume at a checkpoints/step-N folder"
            )
        return folder
    path = Path(resume).expanduser()
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
        return resolve_resume("auto", path)  # a run folder: its latest complete checkpoint
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"train.resume={resume}: cannot resume from it:\n    " + "\n    ".join(problems))
    return path


def check_resumable(checkpoint: Path, fingerprint: dict[str, str], cfg: Config, world_size: int) -> list[str]:
    """Refuse a checkpoint trained on something else; return notes on training settings that changed.

    Base model, quantization, LoRA, tokenizer and data must be the same (by fingerprint), and the
    global batch layout too (the data position is counted in batches). train.* and speed.*
    settings and model.attn_implementation may change (more steps, another learning rate); the
    run then differs from an uninterrupted one, and the notes say so.
    """
    from finetune.fingerprint import differences

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    saved_train = manifest["config"]["train"]
    problems = differences(manifest.get("fingerprint", {}), manifest["config"], fingerprint, cfg)
    if state["batch_size"] != cfg.train.batch_size or state["world_size"] != world_size:
        problems.append(
            f"the batch layout changed (train.batch_size {state['batch_size']} -> {cfg.train.batch_size}, processes "
            f"{state['world_size']} -> {world_size}): the saved data position counts batches of the old layout"
        )
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

    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    if result.unexpected_keys:
        raise CheckpointError(f"{checkpoint} has adapter tensors this model lacks, e.g. {result.unexpected_keys[0]}")
    load_optimizer_state(optimizer, _read_torch(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(_read_torch(checkpoint / "scheduler.pt"))
    if accelerator.scaler is not None:
        if not (checkpoint / "scaler.pt").exists():
            raise CheckpointError(f"{checkpoint} has no gradient scaler state: it was not trained in fp16; "
                                  "resume with the mixed precision it was trained with")
        accelerator.scaler.load_state_dict(_read_torch(checkpoint / "scaler.pt"))
    sampler.load_state_dict(state["sampler"])
    return TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__})


def restore_rng(checkpoint: Path, rank: int) -> None:
    """Put this process's RNG states back to what they were after the checkpoint's step."""
    path = checkpoint / _rng_file(rank)
    if not path.exists():
        raise CheckpointError(f"{checkpoint} has no RNG states for process {rank}: it was saved by fewer processes")
    set_rng_state(_read_torch(path))
