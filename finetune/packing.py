"""Sequence packing: several examples per row, with no attention or loss across their borders.

Examples are placed greedily, in order, into rows of at most `max_length` tokens. Each example's
position ids restart at 0: transformers builds a block-diagonal causal mask from position ids that
restart when no attention mask is passed, so an example attends only to itself. The label of each
example's first token is cleared, so the last token of the previous example is never trained to
predict it; the loss of every example is exactly its loss when trained unpacked.
"""

from __future__ import annotations

import datasets

from finetune.loss import IGNORE_INDEX


def pack(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Rows of packed examples with columns input_ids, labels, position_ids."""
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in dataset:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return datasets.Dataset.from_list(rows)


def fill_ratio(packed: datasets.Dataset, max_length: int) -> float:
    """Share of the packed rows' token slots that hold real tokens."""
    return sum(len(r) for r in packed["input_ids"]) / (len(packed) * max_length) if len(packed) else 0.0
