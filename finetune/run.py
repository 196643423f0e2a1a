"""One run from a composed config: validate everything, save the resolved config, train.

Shared by the CLI (`python -m finetune`) and Python callers (`finetune.run.compose` + `run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import PartialState
from omegaconf import OmegaConf

from finetune.config import (
    Config,
    ConfigError,
    check_architecture,
    check_config,
    default_cache_dir,
    register_schema,
)

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")


def compose(overrides: Optional[list[str]] = None) -> Config:
    """The typed config that `python -m finetune OVERRIDES...` would run (output_dir must be given)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return OmegaConf.to_object(hydra_compose("config", overrides=list(overrides or [])))


def validate(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None) -> str:
    """Report every problem at once, before weights load; return where the weights come from."""
    import torch

    from finetune.model import module_names, resolve_model_source

    cuda = torch.cuda.is_available()
    problems = check_config(cfg, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    if (run_dir / "adapter").exists():
        problems.append(f"output_dir {run_dir} already holds a finished run; pass another output_dir=... or remove it")
    source = cfg.model.name_or_path
    try:
        # Only the main process converts or builds a cached model; the others wait and reuse it.
        with PartialState().main_process_first():
            source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
        problems += check_architecture(cfg, module_names(source, cfg.model))
    except (OSError, ValueError, RuntimeError) as e:
        problems.append(f"model.name_or_path={cfg.model.name_or_path!r} could not be read: {e}")
    if problems:
        raise ConfigError(problems)
    return source


def run(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None):
    """Validate, record the resolved config in the run folder, and train; returns the RunResult."""
    from finetune.checkpoint import write_json_atomic
    from finetune.loop import train

    run_dir = Path(run_dir)
    source = validate(cfg, run_dir, cache_dir)
    if PartialState().is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return train(cfg, source, run_dir)
