"""`python -m finetune.quantize recipe=NAME out=DIR [key=value ...]`: save the recipe's base, quantized.

Loads the base exactly as training would (`quant.*` of the recipe: nf4, fp4 or int8) and writes it
with its `quantization_config` and tokenizer to DIR. Training on it then skips quantizing on every
launch and needs only DIR:

    python -m finetune recipe=NAME model.name_or_path=DIR

A saved base loads as it was saved: its config.json's quantization_config is what transformers
uses, so the run's `quant.*` must say the same (the config check names any difference and the
override that fixes it). Adapters trained on the saved base and on the on-the-fly quantized one
are interchangeable: `finetune.load_adapter(run, base=...)` loads either onto the other.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from finetune.cli import fail
from finetune.config import ConfigError
from finetune.source import default_cache_dir

MANIFEST_KIND = "finetune-quantized-base"


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    out = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    if len(out) != 1 or not out[0]:
        fail("quantize", "give the folder to write once, as out=DIR (e.g. out=bases/bloom-nf4)")
    overrides = [a for a in argv if not a.startswith("out=")]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append("output_dir=runs/quantize")  # composing needs one; nothing is written there
    return Path(out[0]), overrides


def quantize_problems(cfg) -> list[str]:
    """What makes a recipe's base unsuitable for saving quantized."""
    q, p = cfg.quant, []
    if q.mode == "none":
        p.append("quant.mode=none saves nothing quantized: choose quant.mode=nf4, fp4 or int8")
    if q.device_map or q.max_memory or q.int8_fp32_cpu_offload:
        p.append("a base is saved from one device: remove quant.device_map, quant.max_memory and quant.int8_fp32_cpu_offload")
    return p


def save_quantized_base(cfg, out: Path, cache_dir: Optional[Path] = None, device: Optional[torch.device] = None) -> Path:
    """Load the recipe's base quantized and write it (weights, quantization_config, tokenizer) to `out`."""
    from omegaconf import OmegaConf

    from finetune.atomic import atomic_directory
    from finetune.model import load_base
    from finetune.source import load_tokenizer, resolve_model_source

    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model, source)
    model = load_base(cfg.model, cfg.quant, source, device)
    manifest = {
        "kind": MANIFEST_KIND,
        "base_model": cfg.model.name_or_path,
        "base_source": source,
        "random_init": cfg.model.random_init,
        "quant": OmegaConf.to_container(OmegaConf.structured(cfg.quant)),
        "memory_footprint_bytes": model.get_memory_footprint(),
    }
    # Written under a temporary name and renamed when complete, like adapters: a crash never
    # leaves a half-written base that a later run would load.
    with atomic_directory(out, manifest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from finetune.quant import describe, quant_module_problems, quant_problems
    from finetune.run import compose
    from finetune.source import module_names, resolve_model_source

    out, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides)
    except ConfigError as e:
        fail("quantize", f"{e}")
    cuda = torch.cuda.is_available()
    problems = quant_problems(cfg.quant, cfg.model, cuda_available=cuda) + quantize_problems(cfg)
    if out.exists():
        problems.append(f"out={out} exists; give a new folder (a saved base is never overwritten)")
    if not problems:
        source = resolve_model_source(cfg.model, default_cache_dir(), seed=cfg.train.seed)
        problems += quant_module_problems(cfg.quant, module_names(source, cfg.model))
    if problems:
        fail("quantize", f"{ConfigError(problems)}")
    save_quantized_base(cfg, out)
    print(f"finetune.quantize: wrote {cfg.model.name_or_path} as {describe(cfg.quant)} to {out}")
    print(f"train on it with:  python -m finetune {' '.join(o for o in overrides if not o.startswith(('model.', 'output_dir=')))} "
          f"model.name_or_path={out}".replace("  ", " "))


if __name__ == "__main__":
    main()
