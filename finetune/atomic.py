"""Folders and files that appear complete or not at all.

A folder is written under a temporary name in the same parent, every file is flushed to disk, a
manifest listing each file's size and sha256 is written last, and only then is the folder renamed
into place. A reader trusts a folder only if its manifest exists and every file matches it, so a
crash, a kill or a full disk mid-write never produces a folder that is chosen. Staging names carry
a random suffix, so two writers never share one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

MANIFEST = "finetune_manifest.json"


class CheckpointError(ValueError):
    """A saved adapter or checkpoint is missing, incomplete, for another setup, or cannot be written."""


def sha256_file(path: Path) -> str:
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


def write_torch(path: Path, obj: Any) -> None:
    """torch.save through memory, so a failed write raises OSError (torch's own writer raises RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def read_torch(path: Path) -> Any:
    # weights_only: every state file holds only tensors and plain containers (RNG states included:
    # rng_state() stores numpy's as a tensor), so nothing in a checkpoint can run code when loaded.
    return torch.load(path, map_location="cpu", weights_only=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Record every file of `folder` (size and sha256) in its manifest; call it last."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / MANIFEST
    }
    write_json_atomic(folder / MANIFEST, {**manifest, "files": files})


def commit_directory(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
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
    staging = staging_name(final)
    staging.mkdir()
    try:
        yield staging
        commit_directory(staging, final, manifest)
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
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path} does not match its checksum in the manifest (corrupt)")
    return problems




def staging_name(final: Path) -> Path:
    """A fresh temporary name beside `final`: unique per writer, so concurrent writers never collide."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging and retired folders left in `folder` by writers that died; returns them.

    A staging name carries its writer's pid (staging_name); one whose writer is alive is left alone.
    Names without a pid (written before pids were added) are stale by definition once the run lock
    is held.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith(".") or not (".tmp-" in path.name or ".old-" in path.name):
            continue
        pid = path.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0] if ".tmp-" in path.name else ""
        if pid.isdigit() and int(pid) != os.getpid() and _writer_alive(int(pid)):
            continue
        if pid.isdigit() and int(pid) == os.getpid():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
