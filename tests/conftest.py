"""Shared fixtures: tiny random-weight models with a real trained tokenizer, data files, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.tiny import TINY_ARCHITECTURES, build_tiny_tokenizer, save_random_model

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTION_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(6) for b in range(6)
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny_llama"), TINY_ARCHITECTURES["llama"], tokenizer)


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory, tokenizer) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny_bloom"), TINY_ARCHITECTURES["bloom"], tokenizer)


@pytest.fixture(scope="session")
def instruction_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTION_ROWS))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_run_args(model_dir: Path, data_file: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a short, quiet run of the real CLI on a tiny model."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.path={data_file}",
        "data.format=instruction",
        "data.eval_fraction=0.2",
        "data.max_length=64",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "log.wandb=false",
        "sample.prompts=[]",
        f"output_dir={out}",
        *extra,
    ]


def run_cli(args: list[str], cache_dir: Path, module: str = "finetune", timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FINETUNE_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
