"""`python -m finetune recipe=NAME key=value ...` (also under `accelerate launch -m finetune`).

Hydra composes recipes/config.yaml with the chosen presets and overrides (`--cfg job` prints the
result, `-m` sweeps). Before Hydra runs, the overrides are checked (unknown keys, other tools'
names, values of the wrong type, an output folder that cannot be written); then finetune.run
preflights the whole config before any weights load, and trains. Every user error ends as one
"finetune ... error" block and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune.config import Config, ConfigError, normalize_overrides, register_schema
from finetune.run import RECIPES


def fail(kind: str, error: Exception) -> None:
    """Print one clean error block and exit 2."""
    print(f"\nfinetune {kind} error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base=None, config_path=RECIPES, config_name="config")
def _hydra_entry(dict_cfg: DictConfig) -> None:
    from finetune.atomic import CheckpointError
    from finetune.data import DataError
    from finetune.loop import TrainingError
    from finetune.run import run

    cfg: Config = OmegaConf.to_object(dict_cfg)
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        kind = {ConfigError: "config", DataError: "data", CheckpointError: "checkpoint"}.get(type(e), "training")
        fail(kind, e)


_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
_SKIP_FLAGS = ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc")


def check_before_hydra(overrides: list[str]) -> None:
    """Compose once as Hydra will and check the output folder, so that Hydra itself never fails on user input
    (it would exit 1 with its own message, or a traceback creating the run folder)."""
    from finetune.preflight import output_dir_problems
    from finetune.run import compose_normalized

    given, flags = [], []
    items = iter(overrides)
    for item in items:
        if item.startswith("-"):
            flags.append(item)
            if item in _FLAGS_WITH_VALUE:
                next(items, None)
        else:
            given.append(item)
    if any(f.split("=", 1)[0] in _SKIP_FLAGS for f in flags):
        return  # sweeps are composed per job by Hydra; help, info and other configs are Hydra's own
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in given):
        given.append("output_dir=" + str(_default_output_dir(given)))
    cfg = compose_normalized([o for o in given if not o.lstrip("+~").startswith("hydra")])
    problems = output_dir_problems(Path(cfg.output_dir))
    if problems and not {"--cfg", "-c"} & set(flags):  # printing the config writes nothing
        raise ConfigError(problems)


def _default_output_dir(overrides: list[str]) -> str:
    """recipes/config.yaml's default output_dir, runs/<recipe>, for the recipe these overrides choose."""
    import yaml

    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "recipe"]
    if chosen:
        return f"runs/{chosen[-1]}"
    defaults = yaml.safe_load((Path(RECIPES) / "config.yaml").read_text())["defaults"]
    recipe = next(d["recipe"] for d in defaults if isinstance(d, dict) and "recipe" in d)
    return f"runs/{recipe}"


def main() -> None:
    overrides, notes, problems = normalize_overrides(sys.argv[1:])
    if problems:
        fail("config", ConfigError(problems))
    for note in notes:
        print(f"[finetune] {note}", flush=True)
    try:
        check_before_hydra(overrides)
    except ConfigError as e:
        fail("config", e)
    sys.argv = [sys.argv[0], *overrides]
    register_schema()
    _hydra_entry()


if __name__ == "__main__":
    main()
