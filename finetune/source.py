"""Where a base model's weights and tokenizer come from, and what it looks like before any weight loads.

`model.name_or_path` is a hub id, a local folder, `embedded:NAME` (converted once into the cache) or,
with `model.random_init`, an architecture built with random weights and cached as a folder. Every
check that needs the model's modules or shapes uses `meta_model`: a weightless copy on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from finetune.config import ModelConfig
from finetune.embedded import ensure_embedded_model, is_embedded


def default_cache_dir() -> Path:
    """Where converted and random-init models are cached: $FINETUNE_CACHE or ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def resolve_model_source(m: ModelConfig, cache_dir: Path, seed: int = 0) -> str:
    """The folder or hub id that weights are loaded from.

    Embedded models are converted once into the cache; `random_init` models are built from
    `architecture` with random weights, saved once into the cache, and then loaded through the same
    quantizing `from_pretrained` path as real checkpoints (transformers can only quantize on load).
    """
    if m.random_init:
        return str(_random_model_dir(m, cache_dir, seed))
    if is_embedded(m.name_or_path):
        return str(ensure_embedded_model(m.name_or_path, cache_dir))
    return m.name_or_path


def _architecture_config(m: ModelConfig):
    if m.architecture:
        arch = dict(m.architecture)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    return AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)


def _random_model_dir(m: ModelConfig, cache_dir: Path, seed: int) -> Path:
    config = _architecture_config(m)
    key = hashlib.sha256((config.to_json_string() + f"seed={seed}").encode()).hexdigest()[:16]
    target = cache_dir / "random" / f"{config.model_type}-{key}"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(seed)
    staged = target.with_name(target.name + ".tmp")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(staged)
    staged.rename(target)
    return target


def base_config(source: str, m: ModelConfig):
    """The base model's transformers config (read from `source`, or built from model.architecture)."""
    if m.random_init:
        return _architecture_config(m)
    return AutoConfig.from_pretrained(source, revision=m.revision, trust_remote_code=m.trust_remote_code)


def meta_model(source: str, m: ModelConfig, dtype: Optional[torch.dtype] = None):
    """A weightless (meta-device) copy of the model: its modules and shapes, no memory, no weights read."""
    config = base_config(source, m)
    # A base saved already quantized keeps its quantization_config; the copy must be plain.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code, **({"dtype": dtype} if dtype else {}))


def module_names(source: str, m: ModelConfig) -> list[str]:
    """Module names of the model, read from a weightless (meta-device) copy: no weights load."""
    return [name for name, _ in meta_model(source, m).named_modules()]


def load_tokenizer(m: ModelConfig, source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        m.tokenizer or source, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {m.tokenizer or source} has neither a pad nor an eos token; "
                "name a tokenizer that has one with model.tokenizer=..."
            )
        # Padding positions carry label -100 and attention 0, so reusing eos as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def safetensors_files(source: str) -> list[Path]:
    """The safetensors files of a local base folder; FileNotFoundError if it has none."""
    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"the base at {source} has no model.safetensors (or index): the merge reads local safetensors "
                     "weights only; save the base with save_pretrained(safe_serialization=True)")
