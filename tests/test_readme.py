"""The README's commands are the ones CI runs, and every shipped recipe composes and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.preflight import config_problems
from finetune.run import RECIPES, compose

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_command = next(line for line in ci_lines if "pytest" in line and not line.startswith("#"))
    assert test_command in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(RECIPES) / "recipe").glob("*.yaml")))
def test_every_shipped_recipe_composes_and_validates(recipe):
    cfg = compose([f"recipe={recipe}", "output_dir=/tmp/unused"])
    # Recipes are written for a bf16-capable GPU; none may carry a config problem there.
    assert config_problems(cfg, cuda_available=True, bf16_supported=True) == []
