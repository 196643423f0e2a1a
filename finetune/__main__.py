"""`python -m finetune recipe=NAME key=value ...` (also under `accelerate launch -m finetune`).

Hydra composes recipes/config.yaml with the chosen presets and overrides (`--cfg job` prints the
result, `-m` sweeps); finetune.run checks it as a whole before any weights load, then trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune.config import Config, ConfigError, register_schema, unknown_override_keys
from finetune.run import RECIPES


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
        print(f"\nfinetune {kind} error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    # Hydra would reject an unknown key too, but only as "not in struct"; this names the key meant.
    problems = unknown_override_keys(sys.argv[1:])
    if problems:
        print(f"finetune config error: {ConfigError(problems)}", file=sys.stderr)
        sys.exit(2)
    register_schema()
    _hydra_entry()


if __name__ == "__main__":
    main()
