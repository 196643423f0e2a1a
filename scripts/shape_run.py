"""Run a recipe through the real CLI on its model's shapes with random weights (no hub needed).

    python scripts/shape_run.py recipe=bloom_nf4 train.max_steps=15 [more overrides]

Builds the offline tokenizer of finetune.tiny, writes a text dataset of long rows (so every row
fills data.max_length), and launches `python -m finetune ... model.random_init=true`. The run's
start/end summary (footprint, peak memory, tokens/s) is what it prints.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune.tiny import build_tiny_tokenizer


def main(overrides: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="shape_run-"))
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    rng = random.Random(0)
    with open(work / "long.jsonl", "w") as f:
        for _ in range(256):
            ids = [rng.randrange(3, len(tokenizer)) for _ in range(3000)]
            f.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")
    cmd = [
        sys.executable, "-m", "finetune", "model.random_init=true", f"model.tokenizer={work / 'tokenizer'}",
        f"data.path={work / 'long.jsonl'}", "data.format=text", "data.eval_fraction=0", "log.wandb=false",
        "sample.prompts=[]", "train.eval_every=0", "train.save_every=0", f"output_dir={work / 'run'}", *overrides,
    ]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
