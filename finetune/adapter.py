"""The adapter, the product's main output: save it atomically, describe it, verify it, load it back.

An adapter folder is PEFT's standard pair (adapter_config.json + adapter_model.safetensors, never
base weights) plus finetune_manifest.json: each file's checksum, the base it was trained on, the
quantization and the whole run config, so that `load_adapter` rebuilds the same quantized base.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from finetune.atomic import MANIFEST, CheckpointError, atomic_directory, disk_errors, verify_directory
from finetune.config import Config
from finetune.fingerprint import base_fingerprint
from finetune.model import load_base, upcast_frozen_weights
from finetune.quant import quant_from_saved, saved_quantization
from finetune.source import default_cache_dir, load_tokenizer, resolve_model_source

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_KIND = "finetune-adapter"


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
    active = model.active_adapter
    expected = set(get_peft_model_state_dict(model, adapter_name=active))
    # Counted independently of PEFT's own key list: every LoRA layer must have an A and a B. (A DPO
    # reference adapter, finetune.objectives, is a frozen copy and is never saved.)
    n_layers = sum(1 for m in model.modules() if isinstance(m, LoraLayer) and active in m.lora_A)
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


def write_adapter_files(model, folder: Path, *, trained: bool, state_dict: Optional[dict] = None) -> None:
    """PEFT's standard adapter files (never the base weights) into `folder`, checked after writing.

    Only the active adapter is written (a DPO reference copy never is). `state_dict`: the model's full
    (gathered) state where the model itself holds only shards (FSDP).
    """
    model.save_pretrained(str(folder), safe_serialization=True, selected_adapters=[model.active_adapter],
                          state_dict=state_dict)
    missing = [f for f in ADAPTER_FILES if not (folder / f).exists()]
    if missing:
        raise CheckpointError(f"PEFT did not write {missing} into {folder}")
    check_saved_adapter(model, folder, trained=trained)


def save_adapter(model, final: Path, manifest: dict[str, Any], *, trained: bool = True,
                 state_dict: Optional[dict] = None) -> Path:
    """Save the adapter atomically; `trained` also refuses LoRA B matrices that never left zero."""
    with disk_errors("the adapter", final), atomic_directory(final, manifest) as tmp:
        write_adapter_files(model, tmp, trained=trained, state_dict=state_dict)
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


def load_adapter(
    adapter_or_run_dir: str | Path,
    *,
    device: Optional[torch.device] = None,
    cache_dir: Optional[Path] = None,
    is_trainable: bool = False,
    base: Optional[str | Path] = None,
):
    """Return (quantized base with the saved adapter, tokenizer, run config).

    Accepts a run folder (uses its final adapter) or an adapter folder written by finetune; the
    base is rebuilt with the same model and quantization settings recorded at training time.
    `base` loads the adapter onto another copy of the same architecture instead: a base saved
    already quantized by `python -m finetune.quantize` (loaded as saved), or the unquantized base
    an adapter trained on a saved one came from (quantized on the fly with the recorded settings).
    """
    adapter_dir = resolve_adapter_dir(Path(adapter_or_run_dir))
    manifest = read_adapter_manifest(adapter_dir)
    cfg = manifest.config
    if base is not None:
        cfg.model = dataclasses.replace(cfg.model, name_or_path=str(base), random_init=False)
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
    saved = saved_quantization(source)
    if saved is not None:
        # A saved base loads as it was saved; the recorded quant.* may describe another mode.
        cfg.quant = quant_from_saved(cfg.quant, saved)
    tokenizer = load_tokenizer(cfg.model, source)
    base_model = load_base(cfg.model, cfg.quant, source, device)
    # The same upcast of frozen weights as in training, so the reloaded model computes exactly what
    # the trained one did.
    base_model = upcast_frozen_weights(base_model, cfg.quant, cfg.speed.fp32_frozen)
    if is_trainable and cfg.train.gradient_checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    model.eval()
    return model, tokenizer, cfg


def load_adapter_weights(model, adapter_or_run_dir: str | Path) -> AdapterManifest:
    """Put a saved adapter's weights into `model`'s active adapter (lora.init_from); returns its manifest.

    The saved adapter must have the same LoRA layers and ranks as `model`: every tensor is replaced,
    none is left at its fresh initialisation.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    adapter_dir = resolve_adapter_dir(Path(adapter_or_run_dir).expanduser())
    manifest = read_adapter_manifest(adapter_dir)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    missing = sorted(set(expected) - set(weights))
    wrong_shape = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or wrong_shape or set(weights) - set(expected):
        saved = manifest.config.lora
        raise CheckpointError(
            f"lora.init_from={adapter_or_run_dir}: that adapter has other LoRA layers or ranks than this run "
            f"(it was trained with lora.r={saved.r} lora.target_modules={list(saved.target_modules)}"
            + (f"; e.g. {(missing or wrong_shape)[0]} differs" if missing or wrong_shape else "")
            + "): use the same lora.* settings as the adapter"
        )
    set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
    return manifest
