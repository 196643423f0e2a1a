"""Preference data: prompt / chosen / rejected rows, tokenized into two labelled sequences per pair.

A row holds a prompt and two replies, as text or as chat messages. Each reply is rendered after the
prompt exactly as instruction or chat data renders a response (finetune/data.py), so an adapter tuned
with SFT sees its prompts in the same form during DPO or ORPO. Labels come from character offsets, as
in data.py: prompt tokens are never targets, only the reply (and the end-of-turn that closes it).

Batches put every chosen sequence first and every rejected one after it, padded to one width, so the
policy (and the reference) scores both halves of every pair in one forward pass, as TRL does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from jinja2.exceptions import TemplateError

from finetune.config import DataConfig
from finetune.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    PreparedData,
    _check_tokenizer,
    _Encoder,
    _instruction_prefix,
    _InvalidRow,
    _messages,
    _text,
    _with_system,
    encode_split,
    encoded_splits,
    raw_splits,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "preference"
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
SIDES = ("chosen", "rejected")
_FEATURES = datasets.Features(
    {
        **{f"{side}_{k}": datasets.List(datasets.Value("int32")) for side in SIDES for k in ("input_ids", "labels")},
        "_drop": datasets.Value("string"),  # "" (kept), "empty", "too_long" or "no_target"
        "_why": datasets.Value("string"),
        "_truncated": datasets.Value("bool"),
        "_n_tokens": datasets.Value("int64"),  # chosen + rejected
        "_n_target": datasets.Value("int64"),
    }
)


def preference_columns(cfg: DataConfig) -> list[str]:
    return [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field]


def _require_columns(cfg: DataConfig, columns: Sequence[str], what: str) -> None:
    missing = [c for c in preference_columns(cfg) if c not in columns]
    if missing:
        raise DataError(
            f"data.format=preference needs the column(s) {missing}, but {what} has {list(columns)}: set "
            "data.prompt_field, data.chosen_field and data.rejected_field to the right columns"
        )


def _reply(value: Any, field: str) -> list[dict[str, Any]] | str:
    """A reply as text, or as a list of messages whose last is the assistant's."""
    if isinstance(value, list):
        messages = _messages(value, field)
        if messages[-1]["role"] != "assistant":
            raise _InvalidRow(f"the last message of '{field}' is from {messages[-1]['role']!r}, not the assistant")
        return messages
    return _text(value, field)


class _PairEncoder(_Encoder):
    """Turns a batch of raw pairs into chosen/rejected input_ids and labels plus why-dropped columns."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        # A prompt is rendered as instruction data renders it (chat template when the tokenizer has one
        # and no data.prompt_template is set); chat-message rows need the chat template.
        super().__init__(cfg, tokenizer, "instruction")
        self.settings.update(chosen_field=cfg.chosen_field, rejected_field=cfg.rejected_field, train_on_prompt=False)
        # Dataset.map caches by a hash of this object: an edit of this file must invalidate stale caches too.
        self.source = (self.source, _SOURCE_HASH)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        out: dict[str, list[Any]] = {c: [] for c in _FEATURES}
        rendered: dict[int, list[tuple[str, list[tuple[int, int]]]]] = {}
        whys: dict[int, str] = {}
        for i in range(n):
            try:
                rendered[i] = self._render_pair({k: v[i] for k, v in batch.items()})
            except _InvalidRow as e:
                whys[i] = str(e)
        texts = [text for i in rendered for text, _ in rendered[i]]
        encoded = (
            self.tokenizer(texts, add_special_tokens=not self.chat, return_offsets_mapping=True)
            if texts
            else {"input_ids": [], "offset_mapping": []}
        )
        sequences = iter(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))
        max_length, policy = self.settings["max_length"], self.settings["length_policy"]
        for i in range(n):
            pair: dict[str, tuple[list[int], list[int]]] = {}
            drop, why, truncated = ("empty", whys[i], False) if i in whys else ("", "", False)
            if not drop:
                for side, (_, spans) in zip(SIDES, rendered[i], strict=True):
                    ids, offsets = next(sequences)
                    pair[side] = (list(ids), self._labels(ids, offsets, spans))
                longest = max(len(ids) for ids, _ in pair.values())
                if longest > max_length and policy == "drop":
                    drop, why = "too_long", f"{longest} tokens"
                elif longest > max_length:
                    # Keep the start: the prompt and the first tokens of each reply, as TRL's keep_start does.
                    pair = {s: (ids[:max_length], labels[:max_length]) for s, (ids, labels) in pair.items()}
                    truncated = True
                if not drop and any(all(x == IGNORE_INDEX for x in labels) for _, labels in pair.values()):
                    drop, why, truncated = "no_target", "a reply has no target tokens within data.max_length", False
            if drop:
                pair = {side: ([], []) for side in SIDES}
            for side in SIDES:
                out[f"{side}_input_ids"].append(pair[side][0])
                out[f"{side}_labels"].append(pair[side][1])
            out["_drop"].append(drop)
            out["_why"].append(why)
            out["_truncated"].append(truncated)
            out["_n_tokens"].append(sum(len(ids) for ids, _ in pair.values()))
            out["_n_target"].append(sum(x != IGNORE_INDEX for _, labels in pair.values() for x in labels))
        return out

    def _render_pair(self, row: dict[str, Any]) -> list[tuple[str, list[tuple[int, int]]]]:
        """The full text and target character spans of the chosen and of the rejected sequence."""
        s = self.settings
        raw_prompt = row.get(s["prompt_field"])
        prompt = _messages(raw_prompt, s["prompt_field"]) if isinstance(raw_prompt, list) else _text(
            raw_prompt, s["prompt_field"]
        )
        replies = [_reply(row.get(s[f"{side}_field"]), s[f"{side}_field"]) for side in SIDES]
        as_chat = isinstance(prompt, list) or any(isinstance(r, list) for r in replies)
        if as_chat and not self.chat:
            raise DataError(
                "preference rows given as chat messages need a tokenizer with a chat template, and this one has "
                "none (or data.prompt_template is set): set model.tokenizer to a chat tokenizer, or give the "
                "prompt and replies as text"
            )
        if self.chat:
            turns = _with_system(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
                                 s["system_prompt"])
            return [self._chat_reply(turns, reply) for reply in replies]
        prefix = _instruction_prefix(prompt, s["prompt_template"], s["system_prompt"])
        eos = self.tokenizer.eos_token
        texts = [prefix + reply + ("" if reply.endswith(eos) else eos) for reply in replies]
        return [(text, [(len(prefix), len(text))]) for text in texts]

    def _chat_reply(
        self, prompt: list[dict[str, Any]], reply: list[dict[str, Any]] | str
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation prompt + reply; only the reply's assistant turns are targets."""
        reply_turns = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        full, spans = self._chat([*prompt, *reply_turns])
        try:
            prompt_end = len(self._apply(prompt))
        except TemplateError as e:
            raise _InvalidRow(f"the chat template rejected its prompt: {e}") from e
        # Assistant turns inside the prompt (earlier rounds of a conversation) are context, not targets.
        return full, [(a, b) for a, b in spans if a >= prompt_end]


def build_preference_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Load, render, tokenize and label the train (and eval) pairs described by `cfg`.

    The datasets have the columns chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels;
    the report counts pairs as rows and the tokens of both sequences.
    """
    if cfg.format not in (FORMAT, "auto"):
        raise DataError(f"preference tuning reads data.format=preference, not data.format={cfg.format}")
    if cfg.packing:
        raise DataError("data.packing=true cannot pack chosen/rejected pairs; set data.packing=false")
    _check_tokenizer(tokenizer)
    train_raw, eval_raw = raw_splits(cfg)
    _require_columns(cfg, train_raw.column_names, f"split {cfg.split!r}")
    encoder = _PairEncoder(cfg, tokenizer)
    train, evaluation, report = encoded_splits(
        cfg, train_raw, eval_raw,
        lambda ds, split, first: encode_split(ds, cfg, encoder, _FEATURES, split, first, what="pairs of split"),
        lambda columns, what: _require_columns(cfg, columns, what), seed, unit="pairs",
    )
    return PreparedData(train=train, eval=evaluation, report=report, format=FORMAT)


class PairCollator:
    """Pads a list of pairs into one batch: rows [chosen of every pair; rejected of every pair].

    The batch has input_ids, attention_mask and labels (IGNORE_INDEX on prompts and padding) of shape
    (2 * pairs, width); row i and row pairs + i are the two replies of pair i.
    """

    def __init__(self, pad_token_id: int, widths: Sequence[int] | None = None):
        self.collate = Collator(pad_token_id, widths)

    def __call__(self, pairs: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise DataError("cannot collate an empty batch of pairs")
        rows = [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in SIDES
            for pair in pairs
        ]
        return self.collate(rows)
