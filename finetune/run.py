"""One run from a composed config: preflight everything, save the resolved config, train.

Shared by the CLI (`python -m finetune`) and Python callers (`finetune.run.compose` + `run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import PartialState
from omegaconf import OmegaConf

from finetune.config import Config, ConfigError, normalize_overrides, register_schema, type_hint
from finetune.preflight import preflight

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")


def compose(overrides: Optional[list[str]] = None) -> Config:
    """The typed config that `python -m finetune OVERRIDES...` would run (output_dir must be given).

    Raises ConfigError for unknown keys and values of the wrong type, naming the fix.
    """
    overrides, _, problems = normalize_overrides(list(overrides or []))
    if problems:
        raise ConfigError(problems)
    return compose_normalized(overrides)


def compose_normalized(overrides: list[str]) -> Config:
    """`compose` for overrides already through `normalize_overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with initialize_config_dir(config_dir=RECIPES, version_base=None):
            return OmegaConf.to_object(hydra_compose("config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError([composition_problem(e)]) from e


def composition_problem(e: Exception) -> str:
    """One line for Hydra's or OmegaConf's composition error: which key, what it takes."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    message = str(cause).split("\n", 1)[0]
    if key:
        return f"{key}: {message}; {key} takes {type_hint(key)}"
    from hydra.errors import OverrideParseException

    text = " ".join(str(e).split())  # Hydra's multi-line messages (e.g. the available options) on one line
    return f"an override could not be parsed: {text}" if isinstance(e, OverrideParseException) else text


def run(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None):
    """Preflight, record the resolved config in the run folder, and train; returns the RunResult."""
    from finetune.atomic import disk_errors, write_json_atomic
    from finetune.loop import train

    run_dir = Path(run_dir)
    source, resume_from = preflight(cfg, run_dir, cache_dir)
    if PartialState().is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        with disk_errors("config.json", run_dir):
            write_json_atomic(run_dir / "config.json", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return train(cfg, source, run_dir, resume_from)
