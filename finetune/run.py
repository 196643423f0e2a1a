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


def validate(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None) -> tuple[str, Optional[Path]]:
    """Report every problem at once, before weights load.

    Returns where the weights come from, and the checkpoint to resume from (None for a new run).
    """
    import torch

    from finetune.checkpoint import CheckpointError, find_latest_complete, resolve_resume
    from finetune.model import accepts_position_ids, module_names, resolve_model_source

    cuda = torch.cuda.is_available()
    problems = check_config(cfg, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    resume_from = None
    if cfg.train.resume:
        try:
            resume_from = resolve_resume(cfg.train.resume, run_dir)
            problems += resume_problems(resume_from, cfg, run_dir)
        except CheckpointError as e:
            problems.append(str(e))
    elif (run_dir / "adapter").exists():
        problems.append(f"output_dir {run_dir} already holds a finished run; pass another output_dir=..., remove it, "
                        "or add train.resume=auto to train it further (with a larger train.max_steps)")
    elif find_latest_complete(run_dir)[0] is not None:
        problems.append(f"output_dir {run_dir} holds the checkpoints of an interrupted run: go on with it with "
                        "train.resume=auto, or pass another output_dir=...")
    source = cfg.model.name_or_path
    try:
        # Only the main process converts or builds a cached model; the others wait and reuse it.
        with PartialState().main_process_first():
            source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
        problems += check_architecture(cfg, module_names(source, cfg.model))
        if cfg.data.packing and not accepts_position_ids(source, cfg.model):
            problems.append(f"data.packing=true needs a model that takes position ids; {cfg.model.name_or_path} "
                            "does not (e.g. bloom's ALiBi attention): set data.packing=false")
    except (OSError, ValueError, RuntimeError) as e:
        problems.append(f"model.name_or_path={cfg.model.name_or_path!r} could not be read: {e}")
    if problems:
        raise ConfigError(problems)
    return source, resume_from


def resume_problems(checkpoint: Path, cfg: Config, run_dir: Path) -> list[str]:
    """Why resuming from `checkpoint` into `run_dir` makes no sense (what it was trained on is checked later)."""
    from finetune.checkpoint import find_latest_complete

    step = int(checkpoint.name.removeprefix("step-")) if checkpoint.name.startswith("step-") else None
    latest, _ = find_latest_complete(run_dir)
    problems = []
    finished_at = _finished_step(run_dir)
    if step is not None and finished_at is not None and step < finished_at:
        problems.append(f"train.resume: the run in {run_dir} finished at step {finished_at}, but {checkpoint.name} "
                        f"is older: going on from it would redo steps {step + 1}-{finished_at}. Resume into another "
                        "output_dir")
    elif step is not None and step >= cfg.train.max_steps and finished_at is not None:
        problems.append(f"train.resume: the run in {run_dir} already finished at step {step} "
                        f"(train.max_steps={cfg.train.max_steps}); raise train.max_steps to train it further")
    elif step is not None and step > cfg.train.max_steps:
        problems.append(f"train.resume: {checkpoint} is at step {step}, past train.max_steps={cfg.train.max_steps}")
    if latest is not None and step is not None and latest.resolve() != checkpoint.resolve():
        latest_step = int(latest.name.removeprefix("step-"))
        if latest_step > step:
            problems.append(
                f"train.resume={cfg.train.resume}: {run_dir} already holds a later checkpoint ({latest.name}); going on "
                "from an older one would mix two histories in one folder. Resume into another output_dir"
            )
    return problems


def _finished_step(run_dir: Path) -> Optional[int]:
    """The step the run in `run_dir` wrote its final adapter at, or None if it has not finished."""
    import json

    from finetune.checkpoint import MANIFEST

    try:
        return int(json.loads((run_dir / "adapter" / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None if not (run_dir / "adapter").exists() else 0


def run(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None):
    """Validate, record the resolved config in the run folder, and train; returns the RunResult."""
    from finetune.checkpoint import disk_errors, write_json_atomic
    from finetune.loop import train
    from finetune.runlock import RunLock

    run_dir = Path(run_dir)
    # One run per folder: the lock comes before reading the folder's state or writing into it.
    with RunLock(run_dir, main_process=PartialState().is_main_process):
        source, resume_from = validate(cfg, run_dir, cache_dir)
        if PartialState().is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            with disk_errors("config.json", run_dir):
                write_json_atomic(run_dir / "config.json", OmegaConf.to_container(OmegaConf.structured(cfg)))
        return train(cfg, source, run_dir, resume_from)
