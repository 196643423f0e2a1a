"""One run from a composed config: preflight everything, save the resolved config, train.

Shared by the CLI (`python -m finetune`) and Python callers (`finetune.run.compose` + `run`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from omegaconf import OmegaConf

from finetune.config import Config, ConfigError, normalize_overrides, register_schema, type_hint
from finetune.preflight import output_dir_problems, preflight

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")


def process_state() -> PartialState:
    """This process's place in the launch (torchrun, accelerate launch, or plain python), set up once.

    Without CUDA the ranks are a CPU job on gloo: accelerate joins CPU processes into one process
    group only when told the run is a CPU run, and the first PartialState fixes that for good.
    """
    import torch

    return PartialState(cpu=not torch.cuda.is_available())


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
        # A new key under a dict (quant.device_map, model.architecture) needs Hydra's `+`: say so.
        append = str(e).split("To append to your config use ", 1)
        if len(append) == 2:
            return f"{key}: {message}; to add it, prefix the override with +: {append[1].strip()}"
        return f"{key}: {message}; {key} takes {type_hint(key)}"
    from hydra.errors import OverrideParseException

    text = " ".join(str(e).split())  # Hydra's multi-line messages (e.g. the available options) on one line
    return f"an override could not be parsed: {text}" if isinstance(e, OverrideParseException) else text


def run(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None):
    """Take the run folder, preflight, and train; returns the RunResult."""
    from finetune.atomic import remove_stale_staging
    from finetune.loop import train

    run_dir = Path(run_dir)
    is_main = process_state().is_main_process  # before anything else asks accelerate which process this is
    problems = output_dir_problems(run_dir)
    if problems:  # a folder that cannot hold the lock (a file, read-only, full): said with every other problem
        preflight(cfg, run_dir, cache_dir)
        raise ConfigError(problems)
    with locked_run_folder(run_dir):
        source, resume_from = preflight(cfg, run_dir, cache_dir)
        if is_main:
            # Accepted: now the folder may change. Staging folders of writers that died (a kill
            # during a save) would otherwise stay forever, as large as what they held.
            for leftover in remove_stale_staging(run_dir) + remove_stale_staging(run_dir / "checkpoints"):
                print(f"[finetune] removed {leftover}, left by an interrupted save", flush=True)
        return train(cfg, source, run_dir, resume_from)


@contextlib.contextmanager
def locked_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock (one run per folder) for the launch; every process learns if it was refused.

    Only the main process takes the lock; a refusal is sent to the others, which would otherwise go
    on and wait forever for the main process in the first collective.
    """
    from accelerate.utils import broadcast_object_list

    from finetune.runlock import RunLock

    state = PartialState()
    lock = RunLock(run_dir, main_process=state.is_main_process)
    refusal: list = [None]
    try:
        lock.acquire()
    except ConfigError as e:
        refusal = [e.problems]
    if state.num_processes > 1:
        broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])
    try:
        yield
    finally:
        lock.release()
