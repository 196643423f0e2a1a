"""`python -m finetune.inspect [recipe=NAME] [key=value ...] n=5`: the rows training sees, trained tokens marked.

The config is composed exactly as `python -m finetune` composes it and the rows come from the same
`build_datasets` call, so what is shown is what the loss is computed on. Only the tokenizer and the
data load, never model weights. A format that trains on nothing, or on the prompt as well as the
answer when it should not, stops with exit 2: those masking bugs otherwise train silently.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional

USAGE = (
    "usage: python -m finetune.inspect [recipe=NAME] [key=value ...] [n=5] [split=train|eval]\n"
    "  renders n rows as training sees them: trained tokens in [[brackets]] (green on a terminal)"
)
# Config keys are those of `python -m finetune`; these belong to the inspector itself.
OWN_KEYS = ("n", "split")
DUMMY_OUTPUT_DIR = "output_dir=/tmp/finetune-inspect-unused"  # composing needs one; nothing is written

TRAINED_ON, PROMPT_ON, RESET = "\033[1;32m", "\033[2m", "\033[0m"


class InspectError(ValueError):
    """A problem with the inspector's own arguments or with what the data trains on."""


@dataclass
class RowCounts:
    tokens: int  # tokens in the row as trained (after truncation)
    prompt: int  # real tokens without a label (prompt, template, system text)
    trained: int  # tokens with a label
    truncated: Optional[int]  # tokens cut off by data.max_length; None where it cannot be known (packed rows)

    def line(self) -> str:
        cut = "?" if self.truncated is None else str(self.truncated)
        return f"{self.tokens} tokens: {self.prompt} prompt, {self.trained} trained, {cut} truncated"


def parse_args(argv: list[str]) -> tuple[list[str], int, str]:
    """Split the command line into config overrides, the row count and the split to show."""
    overrides, n, split = [], 5, "train"
    for arg in argv:
        if arg in ("-h", "--help"):
            raise InspectError(USAGE)
        key, eq, value = arg.partition("=")
        if key == "n":
            if not value.isdigit() or int(value) < 1:
                raise InspectError(f"n={value!r}: give the number of rows to show as a positive integer, e.g. n=5")
            n = int(value)
        elif key == "split":
            if value not in ("train", "eval"):
                raise InspectError(f"split={value!r}: use split=train or split=eval")
            split = value
        elif not eq:
            raise InspectError(f"{arg!r} is not a key=value override\n{USAGE}")
        else:
            overrides.append(arg)
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in overrides):
        overrides.append(DUMMY_OUTPUT_DIR)
    return overrides, n, split


def row_counts(input_ids: list[int], labels: list[int], truncated: Optional[int]) -> RowCounts:
    from finetune.data import IGNORE_INDEX

    trained = sum(label != IGNORE_INDEX for label in labels)
    return RowCounts(tokens=len(input_ids), prompt=len(input_ids) - trained, trained=trained, truncated=truncated)


def training_problems(tokenizer, input_ids: list[list[int]], labels: list[list[int]], fmt: str,
                      train_on_prompt: bool) -> list[str]:
    """What makes these rows useless to train on: nothing trained, or everything while prompts should not be."""
    from finetune.data import IGNORE_INDEX

    problems = []
    empty = [i for i, row in enumerate(labels) if all(label == IGNORE_INDEX for label in row)]
    if empty:
        problems.append(
            f"{len(empty)} of {len(labels)} rows train on no token at all (every label is -100), e.g. row {empty[0]}: "
            "the prompt fills data.max_length or no target span was found; raise data.max_length or check "
            "the data.*_field settings and the chat template"
        )
    if fmt in ("instruction", "chat") and not train_on_prompt and labels and not any(
        _has_untrained_text(tokenizer, x, y) for x, y in zip(input_ids, labels, strict=True)
    ):
        problems.append(
            f"every row trains on all of its text (only special tokens or whitespace are left out) although "
            f"data.format={fmt} has prompts and data.train_on_prompt=false: the masking found no prompt "
            "(conversations with no user turn, or a template that puts everything in the answer); fix the data "
            "or data.prompt_template, or set data.train_on_prompt=true if that is really meant"
        )
    return problems


def _has_untrained_text(tokenizer, input_ids: list[int], labels: list[int]) -> bool:
    """Whether some untrained token of the row is text (a prompt), not a special token or whitespace."""
    from finetune.data import IGNORE_INDEX

    special = set(tokenizer.all_special_ids)
    return any(label == IGNORE_INDEX and token not in special and tokenizer.decode([token]).strip()
               for token, label in zip(input_ids, labels, strict=True))


def render_row(tokenizer, input_ids: list[int], labels: list[int], colour: bool,
               position_ids: Optional[list[int]] = None) -> str:
    """The row's text, trained runs in [[...]] (or green), prompt runs plain (or dim); packed examples split by ‖."""
    from finetune.data import IGNORE_INDEX

    pieces, run, state = [], [], None
    for k, (token, label) in enumerate(zip(input_ids, labels, strict=True)):
        trained = label != IGNORE_INDEX
        starts_example = position_ids is not None and k > 0 and position_ids[k] == 0
        if run and (trained != state or starts_example):
            pieces.append(_mark(tokenizer.decode(run), state, colour))
            run = []
        if starts_example:
            pieces.append(" ‖ ")
        run.append(token)
        state = trained
    if run:
        pieces.append(_mark(tokenizer.decode(run), state, colour))
    return "".join(pieces)


def _mark(text: str, trained: bool, colour: bool) -> str:
    if colour:
        return f"{TRAINED_ON if trained else PROMPT_ON}{text}{RESET}"
    return f"[[{text}]]" if trained else text


def _full_lengths(cfg, tokenizer, split: str) -> dict[tuple[int, ...], int]:
    """Untruncated token counts of the rows of `split`, keyed by their first data.max_length ids."""
    from finetune.data import build_datasets

    d = cfg.data
    raw_split = d.eval_split if split == "eval" and d.eval_split else d.split
    whole = dataclasses.replace(d, split=raw_split, max_length=2**31 - 1, length_policy="truncate", packing=False,
                                eval_split=None, eval_fraction=0.0)
    full = build_datasets(whole, tokenizer, cfg.train.seed).train
    return {tuple(ids[: d.max_length]): len(ids) for ids in full["input_ids"] if len(ids) > d.max_length}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, n, split = parse_args(argv)
    except InspectError as e:
        print(f"finetune.inspect: {e}", file=sys.stderr)
        return 2
    from finetune.config import ConfigError, normalize_overrides
    from finetune.source import default_cache_dir

    overrides, _, problems = normalize_overrides(overrides)
    if problems:
        print(f"finetune.inspect config error: {ConfigError(problems)}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.data import DataError, build_datasets
    from finetune.run import compose
    from finetune.source import load_tokenizer, resolve_model_source

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"finetune.inspect config error: {e}", file=sys.stderr)
        return 2
    try:
        # A named tokenizer needs no model folder; otherwise the tokenizer lives with the weights' source.
        source = cfg.model.tokenizer or resolve_model_source(cfg.model, default_cache_dir(), seed=cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model, source)
    except (OSError, ValueError) as e:
        print(f"finetune.inspect config error: the tokenizer of {cfg.model.name_or_path!r} could not be read: {e}",
              file=sys.stderr)
        return 2
    try:
        data = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    except DataError as e:
        print(f"\nfinetune.inspect: THIS DATA TRAINS ON NOTHING OR CANNOT BE READ\nfinetune data error: {e}",
              file=sys.stderr)
        return 2
    rows_ds = data.train if split == "train" else data.eval
    if rows_ds is None:
        print("finetune.inspect: split=eval but the config holds out no eval rows: set data.eval_split or "
              "data.eval_fraction", file=sys.stderr)
        return 2

    for line in data.report.lines():
        print(line)
    problems = training_problems(tokenizer, rows_ds["input_ids"], rows_ds["labels"], data.format, cfg.data.train_on_prompt)
    if problems:
        print("\nfinetune.inspect: THE LABELS ARE WRONG\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    shown = rows_ds.select(range(min(n, len(rows_ds))))
    packed = "position_ids" in shown.column_names
    cut = (_full_lengths(cfg, tokenizer, split)
           if not packed and data.report.truncated and any(len(r) >= cfg.data.max_length for r in shown["input_ids"])
           else {})
    colour = sys.stdout.isatty()
    legend = (f"{TRAINED_ON}trained{RESET} {PROMPT_ON}not trained{RESET}" if colour
              else "[[trained]] not trained")
    print(f"format: {data.format}, split: {split}, {len(shown)} of {len(rows_ds)} rows; {legend}")
    for i, row in enumerate(shown):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        truncated = None if packed else cut.get(tuple(ids), len(ids)) - len(ids)
        print(f"\n--- row {i}: {row_counts(ids, labels, truncated).line()}")
        print(render_row(tokenizer, ids, labels, colour, row.get("position_ids")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
