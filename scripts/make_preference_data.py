"""Write finetune/datasets/terse_preferences.jsonl, the demo pairs for train.objective=dpo|orpo.

Each question of terse_answers.jsonl with its terse answer as the chosen reply and a chatty,
hedging paraphrase of the same answer as the rejected one: the pairs teach a style, not facts, so
a short DPO run after SFT (or ORPO alone) shows a change in a sample at once. Deterministic;
`--check` fails if the shipped file is stale.

    python scripts/make_preference_data.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parent.parent / "finetune" / "datasets"
SOURCE = DATASETS / "terse_answers.jsonl"
OUT = DATASETS / "terse_preferences.jsonl"

VERBOSE = [
    "Great question! There are many ways to think about this, but after some consideration I would say "
    "the answer is {a}. Let me know if you want more detail.",
    "Well, that depends on how you look at it. Many people would tell you {a}, and I think that is "
    "probably right, although I am not completely sure.",
    "Sure! I'd be happy to help with that. The short version is: {a}. I hope this helps, and feel free "
    "to ask me anything else!",
    "Let me think about this step by step. First, we consider the question carefully. Then we recall "
    "what we know. In the end, the answer is {a}.",
]


def render() -> str:
    lines = []
    for i, line in enumerate(SOURCE.read_text().splitlines()):
        messages = json.loads(line)["messages"]
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        core = m.group(1) if (m := re.fullmatch(r"Answer: (.*)\.", answer)) else answer
        row = {"prompt": prompt, "chosen": answer, "rejected": VERBOSE[i % len(VERBOSE)].format(a=core)}
        lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the shipped file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/make_preference_data.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {text.count(chr(10))} pairs to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
