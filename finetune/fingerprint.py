"""What a run's trained state depends on, hashed, so a checkpoint is never resumed on something else.

A checkpoint or adapter records one sha256 per part (base model, quantization, LoRA, tokenizer,
training data). Resuming compares them part by part and names what changed. Each part hashes what
the numbers depend on, not where it was read from: a base model or data file that was moved but is
byte-for-byte the same still matches, and one that was replaced at the same path does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from finetune.config import Config

# Settings that say where modules live, not what they compute: changing them keeps a run resumable.
_PLACEMENT_KEYS = ("device_map", "max_memory")
# Fields of a model's config.json that vary with the saving library, not with the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "architectures")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_SAMPLE_BYTES = 1 << 16


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _model_config(source: str, cfg: Config) -> dict[str, Any]:
    from transformers import AutoConfig

    m = cfg.model
    config = AutoConfig.from_pretrained(source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _weights_sample(folder: Path) -> list[Any]:
    """Name, size, and the first and last 64 KiB of each weight file: a cheap identity, not a full hash.

    The head of a safetensors file holds every tensor's name, shape and offset plus the first
    tensor's bytes; the tail holds the last tensor's. Reading all of a 70B model would take minutes.
    """
    sample = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SAMPLE_BYTES)
            f.seek(max(0, size - _SAMPLE_BYTES))
            tail = f.read(_SAMPLE_BYTES)
        sample.append([path.name, size, hashlib.sha256(head + tail).hexdigest()])
    return sample


def base_fingerprint(cfg: Config, source: str) -> str:
    """The base model's architecture config and (for a local folder) a sample of its weight files."""
    local = Path(source)
    return _sha256_json({
        "config": _model_config(source, cfg),
        # A hub model is identified by its revision; a local folder by its bytes.
        "revision": cfg.model.revision,
        "weights": _weights_sample(local) if local.is_dir() else None,
    })


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return _sha256_json({
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def dataset_fingerprint(dataset) -> str:
    """sha256 of the tokenized rows (every token column, in order): the exact data a run trains on.

    Everything that shapes the training rows is in it: the file's content, formatting, masking,
    max_length, filtering and the seeded eval hold-out.
    """
    h = hashlib.sha256(f"rows={len(dataset)}".encode())
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        # input_ids and labels, or chosen_*/rejected_* of pairs; packed rows' position_ids follow from them
        for column in sorted(c for c in table.column_names if c != "position_ids"):
            values = table.column(column).combine_chunks()
            h.update(np.asarray(values.value_lengths()).tobytes())
            h.update(np.asarray(values.flatten()).tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: Config, source: str, tokenizer, train_set, eval_set=None) -> dict[str, str]:
    """One hash per part a trained adapter, its optimizer state and its eval history depend on."""
    quant = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg.quant)).items() if k not in _PLACEMENT_KEYS}
    return {
        "base": base_fingerprint(cfg, source),
        "quant": _sha256_json(quant),
        "lora": _sha256_json(OmegaConf.to_container(OmegaConf.structured(cfg.lora))),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": _sha256_json([dataset_fingerprint(train_set), eval_set is not None and dataset_fingerprint(eval_set)]),
        "objective": _sha256_json({k: getattr(cfg.train, k) for k in _OBJECTIVE_KEYS}),
    }


# What a run minimizes: changing it mid-run would make the optimizer state and the loss curve another run's.
_OBJECTIVE_KEYS = ("objective", "dpo_beta", "dpo_label_smoothing", "dpo_loss", "dpo_reference_free", "orpo_beta")

# What to show the user for each part, as config keys whose old and new values are printed.
_PART_KEYS = {
    "base": ("model.name_or_path", "model.revision", "model.architecture", "model.random_init"),
    "quant": tuple(f"quant.{k}" for k in ("mode", "compute_dtype", "double_quant", "quant_storage",
                                           "int8_threshold", "int8_skip_modules", "int8_fp32_cpu_offload")),
    "lora": tuple(f"lora.{k}" for k in ("r", "alpha", "dropout", "target_modules", "modules_to_save", "bias", "use_rslora",
                                         "init_from")),
    "objective": tuple(f"train.{k}" for k in _OBJECTIVE_KEYS),
    "tokenizer": ("model.tokenizer", "model.name_or_path"),
    "data": tuple(f"data.{k}" for k in ("path", "name", "split", "format", "max_length", "length_policy",
                                         "train_on_prompt", "eval_fraction", "eval_split", "max_samples",
                                         "prompt_template", "system_prompt", "packing")),
}
_PART_NAMES = {
    "base": "the base model",
    "quant": "the quantization settings",
    "lora": "the LoRA settings",
    "tokenizer": "the tokenizer",
    "data": "the data",
    "objective": "the training objective",
}


def _get(config: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def differences(saved: dict[str, str], saved_config: dict[str, Any], current: dict[str, str], cfg: Config) -> list[str]:
    """A line per part whose hash differs, naming the config values that changed (if any did)."""
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    lines = []
    for part, name in _PART_NAMES.items():
        if part not in saved or saved.get(part) == current.get(part):
            continue  # (a part a checkpoint of an older finetune did not record is not compared)
        changed = [
            f"{key}: {_get(saved_config, key)!r} -> {_get(now, key)!r}"
            for key in _PART_KEYS[part]
            if _get(saved_config, key) != _get(now, key)
        ]
        lines.append(
            f"{name} changed ("
            + ("; ".join(changed) if changed else "same settings, different content on disk")
            + ")"
        )
    return lines
