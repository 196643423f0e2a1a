"""Write adapters and checkpoints atomically; find and verify them on the way back in.

A folder is written under a temporary name in the same parent, every file is flushed to disk,
a manifest listing each file's size and sha256 is written last, and only then is the folder
renamed into place. A reader trusts a folder only if its manifest exists and every file
matches it, so a crash or full disk mid-save can never produce a folder that is chosen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.config import Config

MANIFEST = "finetune_manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CheckpointError(ValueError):
    """A saved adapter or checkpoint is missing, incomplete, or for another setup."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        files = {
            str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        write_json_atomic(staging / MANIFEST, {**manifest, "files": files})
        _fsync_tree(staging)
        if final.exists():
            # Move the old folder aside first; it is deleted only once the new one is in place.
            retired = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(retired)
            staging.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_directory(folder: Path) -> list[str]:
    """Problems with a folder written by `atomic_directory`; empty when it is complete."""
    if not folder.is_dir():
        return [f"{folder} does not exist or is not a folder"]
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return [f"{folder} has no {MANIFEST}: it was not written completely by finetune"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{manifest_path} is corrupt: {e}"]
    problems = []
    for rel, meta in manifest.get("files", {}).items():
        path = folder / rel
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{path} does not match its checksum in the manifest (corrupt)")
    return problems


def adapter_manifest(cfg: Config, *, source: str, step: int) -> dict[str, Any]:
    """What an adapter needs to be loaded back onto the right base, and checked against it."""
    return {
        "kind": "finetune-adapter",
        "step": step,
        "base_model": cfg.model.name_or_path,
        "base_source": source,
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "quant": OmegaConf.to_container(OmegaConf.structured(cfg.quant)),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }


def save_adapter(model, final: Path, manifest: dict[str, Any]) -> Path:
    """Save only the adapter weights (standard PEFT files), never the base, atomically."""
    with atomic_directory(final, manifest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        missing = [f for f in ADAPTER_FILES if not (tmp / f).exists()]
        if missing:
            raise CheckpointError(f"PEFT did not write {missing} into {tmp}")
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
    problems = verify_directory(adapter_dir)
    if problems:
        raise CheckpointError(f"the adapter at {adapter_dir} cannot be trusted:\n  " + "\n  ".join(problems))
    return AdapterManifest(adapter_dir, json.loads((adapter_dir / MANIFEST).read_text()))
