"""Training data: load a dataset, render each row to text, tokenize, mask the labels, pad batches.

Every row is rendered to one text plus the character spans the model learns to produce (the
response, every assistant turn, or the whole text). The text is tokenized once with offsets and a
token gets a label when its characters overlap a target span. Masks come from offsets, never from
token ids: with pad == eos (SmolLM2 and many chat models), masking `input_ids == pad_id` would also
hide the EOS that teaches the model to stop.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from jinja2.exceptions import TemplateError

from finetune.config import DataConfig
from finetune.loss import IGNORE_INDEX
from finetune.packing import fill_ratio, pack

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EMBEDDED_DIR = Path(__file__).parent / "datasets"
EMBEDDED_PREFIX = "embedded:"
ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"

# Dataset.map caches by a hash of the function's arguments, and functions of an installed module are
# hashed by name only; hashing this file's source too makes an edit here invalidate stale caches.
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_HELPER_COLUMNS = ["_drop", "_why", "_truncated", "_n_tokens", "_n_target"]
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "_drop": datasets.Value("string"),  # "" (kept), "empty", "too_long" or "no_target"
        "_why": datasets.Value("string"),
        "_truncated": datasets.Value("bool"),
        "_n_tokens": datasets.Value("int64"),
        "_n_target": datasets.Value("int64"),
    }
)


class DataError(ValueError):
    """A problem with the data or the data.* settings, phrased with how to fix it."""


@dataclass
class DataReport:
    """Row and token counts shown to the user in the start summary.

    Row counts cover the train and eval rows read; token counts cover the train set only.
    """

    rows: int
    kept: int
    dropped_empty: int  # empty, missing, None or wrongly typed fields
    dropped_too_long: int
    dropped_no_target: int
    truncated: int
    train_rows: int
    eval_rows: int
    train_tokens: int
    target_tokens: int
    packed_rows: int = 0  # with data.packing: the rows the train examples were packed into
    packed_fill: float = 0.0  # the share of those rows' token slots holding real tokens
    drop_reasons: dict[str, tuple[int, str]] = field(default_factory=dict)  # why -> (rows, e.g. "row 17")

    def lines(self) -> list[str]:
        out = [
            f"data: {self.rows} rows read, {self.kept} kept ({self.train_rows} train, {self.eval_rows} eval)"
        ]
        if self.drop_reasons:
            out.append("dropped: " + ", ".join(_reason_lines(self.drop_reasons)))
        if self.truncated:
            out.append(f"truncated to data.max_length: {self.truncated} rows")
        share = self.target_tokens / self.train_tokens if self.train_tokens else 0.0
        out.append(f"train tokens: {self.train_tokens}, trained on: {self.target_tokens} ({share:.0%})")
        if self.packed_rows:
            out.append(f"packed: {self.train_rows} examples into {self.packed_rows} rows ({self.packed_fill:.0%} full)")
        return out


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns input_ids, labels (IGNORE_INDEX where there is no loss)
    eval: datasets.Dataset | None
    report: DataReport
    format: str  # the resolved format: text | instruction | chat


# ---------------------------------------------------------------------------------------------- loading


def load_raw(cfg: DataConfig) -> datasets.DatasetDict:
    """Load `cfg.path` with `datasets.load_dataset`: a local file or folder, embedded:NAME, or a hub name."""
    path = cfg.path
    if path.startswith(EMBEDDED_PREFIX):
        return _load_local(_embedded_file(path[len(EMBEDDED_PREFIX) :]))
    local = Path(path).expanduser()
    if local.exists():
        return _load_local(local)
    if path.startswith(("/", "./", "../", "~")) or local.suffix in DATA_SUFFIXES:
        raise DataError(
            f"data.path={path!r} does not exist: point it at a .json/.jsonl/.csv/.parquet file or a folder "
            f"of them, or use one of the shipped datasets: {_embedded_names()}"
        )
    try:
        loaded = datasets.load_dataset(path, name=cfg.name)
    except Exception as e:  # the hub raises many types (offline, not found, gated, bad config name)
        raise DataError(
            f"could not load dataset {path!r} (config {cfg.name!r}) from the hub: {type(e).__name__}: {e}\n"
            "Check the name and data.name; with no hub access, point data.path at a local "
            f".json/.jsonl/.csv/.parquet file or folder, or use one of {_embedded_names()}"
        ) from e
    return _as_dict(loaded)


def _embedded_names() -> str:
    names = sorted(EMBEDDED_PREFIX + p.stem for p in EMBEDDED_DIR.glob("*.jsonl"))
    return ", ".join(names) or "(none shipped)"


def _embedded_file(name: str) -> Path:
    file = EMBEDDED_DIR / f"{name}.jsonl"
    if not name or not file.is_file():
        raise DataError(f"no embedded dataset {name!r}; the shipped ones are: {_embedded_names()}")
    return file


def _load_local(path: Path) -> datasets.DatasetDict:
    if path.is_dir():
        splits = _folder_splits(path)
        builders = {DATA_SUFFIXES[Path(f).suffix] for files in splits.values() for f in files}
        if not builders:
            raise DataError(f"data.path={str(path)!r} is a folder with no .json/.jsonl/.csv/.parquet files")
        if len(builders) > 1:
            raise DataError(
                f"data.path={str(path)!r} mixes file types ({', '.join(sorted(builders))}); "
                "keep one type per folder or point data.path at one file"
            )
        builder = builders.pop()
    else:
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(
                f"data.path={str(path)!r} has an unsupported suffix {path.suffix!r}; "
                f"use one of {', '.join(DATA_SUFFIXES)}"
            )
        splits = {"train": [str(path)]}
        builder = DATA_SUFFIXES[path.suffix]
    if builder != "parquet":
        return datasets.DatasetDict({name: _read_text_files(files) for name, files in splits.items()})
    try:
        return _as_dict(datasets.load_dataset("parquet", data_files=splits))
    except Exception as e:  # a damaged parquet file surfaces as several exception types
        raise DataError(f"could not read {path} as parquet: {type(e).__name__}: {e}") from e


def _folder_splits(folder: Path) -> dict[str, list[str]]:
    """The data files of `folder` by split, named as datasets names them (train.jsonl, test.jsonl, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except FileNotFoundError:  # datasets' EmptyDatasetError: no files at all
        return {}
    splits = {str(name): sorted(f for f in files if Path(f).suffix in DATA_SUFFIXES) for name, files in found.items()}
    return {name: files for name, files in splits.items() if files}


# ------------------------------------------------------------------------- reading JSON, JSON lines, CSV
#
# JSON and CSV files are read here, not by datasets' loaders: those type each column from its values,
# so a JSON column mixing "61" and 61 turns into a JSON-typed column whose strings are decoded ("7",
# "true", "null" become numbers, bools, None) and a CSV column of numbers becomes int64. Either way a
# valid row reached the text checks as a non-string and was dropped. Here every scalar arrives as the
# text the user wrote (numbers keep their spelling, true stays "true"); only missing or empty fields
# are dropped later. Files are read twice, a line at a time (once for the columns, once for the
# rows), so a large file is never held in memory.


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of `path`; invalid UTF-8 is a DataError naming the line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from e
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _as_written(value: Any) -> Any:
    """JSON true/false as their text; numbers are already text (see _parse_json)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return [_as_written(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_written(v) for k, v in value.items()}
    return value


def _parse_json(text: str) -> Any:
    # Numbers and NaN/Infinity keep the spelling the user wrote: 1.50 stays "1.50", not 1.5.
    return _as_written(json.loads(text, parse_int=str, parse_float=str, parse_constant=str))


def _json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> DataError:
    return DataError(
        f"{path}, line {line or e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
        "a .jsonl file holds one JSON object per line, a .json file one array of objects"
    )


def _object(path: Path, line: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string"}.get(type(value), "a scalar")
        raise DataError(f"{path}, line {line}: {kind}, where each row must be a JSON object {{\"column\": value, ...}}")
    return value


def _json_file_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON lines file, or of a .json file holding one array of objects (or of columns)."""
    lines = _utf8_lines(path)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        raise DataError(f"{path} is empty: it holds no rows")
    number, line = first
    try:
        row = _parse_json(line)
    except json.JSONDecodeError:
        row = None  # not one object per line: one JSON document over several lines
    if isinstance(row, dict):
        yield row
        for number, line in lines:
            if line.strip():
                try:
                    yield _object(path, number, _parse_json(line.strip()))
                except json.JSONDecodeError as e:
                    raise _json_error(path, e, number) from e
        return
    for _ in lines:  # check the rest of the file is UTF-8 too, naming the line if not
        pass
    try:
        document = _parse_json(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from e
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        columns = list(document)  # {"column": [values...], ...}
        yield from (dict(zip(columns, values, strict=False)) for values in zip(*document.values(), strict=False))
    elif isinstance(document, list):
        yield from (_object(path, number, row) for row in document)
    else:
        raise DataError(f"{path}: a JSON document that is neither an array of row objects nor a dict of columns")


def _csv_file_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a CSV file with a header line; every cell is text, an empty cell is empty text."""
    numbered = _utf8_lines(path)
    where = [0]

    def text_lines() -> Iterator[str]:
        for number, line in numbered:
            where[0] = number
            yield line

    reader = csv.reader(text_lines())
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path} is empty: it holds no header line and no rows")
    try:
        for record in reader:
            if not record:
                continue  # a blank line
            if len(record) > len(header):
                raise DataError(
                    f"{path}, line {where[0]}: {len(record)} fields, but the header names {len(header)}; "
                    "quote fields that hold commas"
                )
            yield dict(zip(header, record, strict=False))
    except csv.Error as e:
        raise DataError(f"{path}, line {where[0]}: not valid CSV ({e})") from e


def _file_rows(files: list[str], json_columns: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The rows of `files` in order. Values of `json_columns` come as JSON text: datasets' Json
    feature would parse a plain string that looks like JSON ("7", "null") into a number or None."""
    for file in files:
        path = Path(file)
        for row in _csv_file_rows(path) if path.suffix == ".csv" else _json_file_rows(path):
            for key in json_columns:
                if row.get(key) is not None:
                    row[key] = json.dumps(row[key])
            yield row


_ARROW_CHUNK_ROWS = 10_000


def _read_text_files(files: list[str]) -> datasets.Dataset:
    """One split from JSON/JSON lines/CSV files, every field as the text the user wrote.

    The rows are written in chunks to an Arrow file in datasets' cache, keyed by the files' paths,
    sizes and modification times and by this module's source, and memory-mapped from there.
    """
    import pyarrow as pa

    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([stamps, _SOURCE_HASH]).encode()).hexdigest()[:24]
    cached = Path(datasets.config.HF_DATASETS_CACHE) / "finetune_text_files" / f"{key}.arrow"
    if cached.is_file():
        return datasets.Dataset.from_file(str(cached))
    nested: dict[str, bool] = {}  # column -> holds a list or dict somewhere (messages)
    rows = 0
    for row in _file_rows(files):
        rows += 1
        for column, value in row.items():
            nested[column] = nested.get(column, False) or isinstance(value, (list, dict))
    if not nested:
        what = "no rows" if not rows else f"{rows} rows, all empty objects"
        raise DataError(f"{', '.join(files)}: {what}; nothing to train on")
    # Text columns are strings; nested ones stay JSON, so messages keep whatever keys each one has.
    features = datasets.Features(
        {k: datasets.Json() if is_nested else datasets.Value("string") for k, is_nested in nested.items()}
    )
    schema = features.arrow_schema
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            chunk: list[dict[str, Any]] = []
            for row in _file_rows(files, tuple(k for k, is_nested in nested.items() if is_nested)):
                chunk.append(row)
                if len(chunk) == _ARROW_CHUNK_ROWS:
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    chunk = []
            if chunk:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        os.replace(partial, cached)  # whole or absent: a reader never maps a half-written file
    finally:
        partial.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(cached))


def _as_dict(loaded: Any) -> datasets.DatasetDict:
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            f"expected a map-style dataset, got {type(loaded).__name__}; streaming is not supported"
        )
    return loaded


def _split(raw: datasets.DatasetDict, name: str, key: str, path: str) -> datasets.Dataset:
    if name not in raw:
        raise DataError(f"data.{key}={name!r} is not a split of {path}; its splits are: {', '.join(raw)}")
    return raw[name]


def _format_columns(cfg: DataConfig) -> dict[str, list[str]]:
    return {
        "chat": [cfg.messages_field],
        "instruction": [cfg.prompt_field, cfg.response_field],
        "text": [cfg.text_field],
    }


def _require_columns(cfg: DataConfig, fmt: str, columns: Sequence[str], what: str) -> None:
    missing = [c for c in _format_columns(cfg)[fmt] if c not in columns]
    if missing:
        keys = {
            "chat": "data.messages_field",
            "instruction": "data.prompt_field and data.response_field",
            "text": "data.text_field",
        }
        raise DataError(
            f"format {fmt} needs the column(s) {missing}, but {what} has {list(columns)}: "
            f"set {keys[fmt]} to the right column(s)"
        )


def resolve_format(cfg: DataConfig, columns: Sequence[str]) -> str:
    """The format `cfg.format` means for a dataset with these columns; `auto` guesses from them."""
    if cfg.format == "auto":
        for fmt, needed in _format_columns(cfg).items():  # most specific first
            if all(c in columns for c in needed):
                return fmt
        raise DataError(
            f"cannot tell the data format from the columns {list(columns)}: set data.format "
            f"(text|instruction|chat) and the column names: data.messages_field={cfg.messages_field!r}, "
            f"data.prompt_field={cfg.prompt_field!r} + data.response_field={cfg.response_field!r}, "
            f"or data.text_field={cfg.text_field!r}"
        )
    if cfg.format not in _format_columns(cfg):
        raise DataError(f"data.format={cfg.format!r} is not one of auto, text, instruction, chat")
    _require_columns(cfg, cfg.format, columns, "the data")
    return cfg.format


# -------------------------------------------------------------------------------------------- rendering


class _InvalidRow(Exception):
    """A row that cannot be trained on (empty, missing or wrongly typed); it is dropped and counted."""


def _uses_chat_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, fmt: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat":
        if not has_template:
            raise DataError(
                "data.format=chat needs a tokenizer with a chat template, and this one has none: "
                "set model.tokenizer to a chat tokenizer, or use data.format=instruction"
            )
        return True
    return fmt in ("instruction", "auto") and cfg.prompt_template is None and has_template


def _with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _instruction_prefix(prompt: str, prompt_template: str | None, system_prompt: str | None) -> str:
    template = prompt_template or ALPACA_TEMPLATE
    try:
        text = template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"data.prompt_template could not be filled ({type(e).__name__}: {e}): it may hold only "
            "{prompt}; write literal braces as {{ and }}"
        ) from e
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def render_prompt(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, prompt: str, fmt: str | None = None
) -> str:
    """The text a generation prompt is rendered to, exactly as the prompt part of a training row.

    `fmt` is the resolved format (PreparedData.format); by default `cfg.format`, where `auto`
    renders like instruction data.
    """
    fmt = fmt or cfg.format
    if fmt == "text":
        return prompt
    if _uses_chat_template(cfg, tokenizer, fmt):
        messages = _with_system([{"role": "user", "content": prompt}], cfg.system_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _instruction_prefix(prompt, cfg.prompt_template, cfg.system_prompt)


def encode_prompt(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, prompt: str, fmt: str | None = None
) -> list[int]:
    """Token ids of `render_prompt`, with special tokens added exactly as for training rows."""
    fmt = fmt or cfg.format
    text = render_prompt(cfg, tokenizer, prompt, fmt)
    chat = fmt != "text" and _uses_chat_template(cfg, tokenizer, fmt)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _text(value: Any, field: str) -> str:
    if value is None:
        raise _InvalidRow(f"a missing '{field}'")
    if isinstance(value, bool):  # typed columns (parquet): a value is its text, as in JSON
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise _InvalidRow(f"'{field}' of type {type(value).__name__}")
    if not value.strip():
        raise _InvalidRow(f"an empty '{field}'")
    return value


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _InvalidRow(f"'{field}' not a non-empty list of {{role, content}} messages")
    messages = []
    for m in value:
        if not isinstance(m, dict):
            raise _InvalidRow(f"a message of '{field}' of type {type(m).__name__}, not a {{role, content}} dict")
        if not isinstance(m.get("role"), str) or not m["role"].strip():
            raise _InvalidRow(f"a message of '{field}' with no 'role'")
        if isinstance(m.get("content"), (int, float)):  # a typed column's number is its text
            m = {**m, "content": _text(m["content"], "content")}
        if not isinstance(m.get("content"), str):
            raise _InvalidRow(f"a message of '{field}' with content of type {type(m.get('content')).__name__}")
        # Arrow gives every message every key seen in the column; drop the filled-in Nones.
        messages.append({k: v for k, v in m.items() if v is not None})
    if not any(m["content"].strip() for m in messages):
        raise _InvalidRow(f"every message of '{field}' empty")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise _InvalidRow(f"an empty assistant message in '{field}'")
    return messages


class _Encoder:
    """Turns a batch of raw rows into input_ids/labels plus why-dropped columns (a Dataset.map function)."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, fmt: str):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.chat = _uses_chat_template(cfg, tokenizer, fmt)
        # Primitives only: the map fingerprint hashes this object, and a Hydra DictConfig hashes poorly.
        self.settings = {
            k: getattr(cfg, k)
            for k in (
                "text_field",
                "prompt_field",
                "input_field",
                "response_field",
                "messages_field",
                "system_prompt",
                "prompt_template",
                "max_length",
                "length_policy",
                "train_on_prompt",
            )
        }
        self.source = _SOURCE_HASH

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        out: dict[str, list[Any]] = {c: [] for c in _FEATURES}
        rendered: list[tuple[int, str, list[tuple[int, int]]]] = []
        whys: dict[int, str] = {}
        for i in range(n):
            try:
                text, spans = self._render({k: v[i] for k, v in batch.items()})
                rendered.append((i, text, spans))
            except _InvalidRow as e:
                whys[i] = str(e)
        encoded = (
            self.tokenizer(
                [text for _, text, _ in rendered],
                # Chat templates write BOS and friends themselves; adding them again would double them.
                add_special_tokens=not self.chat,
                return_offsets_mapping=True,
            )
            if rendered
            else {"input_ids": [], "offset_mapping": []}
        )
        rows = {
            i: (ids, self._labels(ids, offsets, spans))
            for (i, _, spans), ids, offsets in zip(
                rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
            )
        }
        max_length, policy = self.settings["max_length"], self.settings["length_policy"]
        for i in range(n):
            ids, labels, drop, why, truncated = [], [], "", "", False
            if i in whys:
                drop, why = "empty", whys[i]
            else:
                ids, labels = rows[i]
                if len(ids) > max_length and policy == "drop":
                    drop, why = "too_long", f"{len(ids)} tokens"
                elif len(ids) > max_length:
                    ids, labels, truncated = ids[:max_length], labels[:max_length], True
                if not drop and all(label == IGNORE_INDEX for label in labels):
                    drop, why, truncated = "no_target", "no target tokens within data.max_length", False
                if drop:
                    ids, labels = [], []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_drop"].append(drop)
            out["_why"].append(why)
            out["_truncated"].append(truncated)
            out["_n_tokens"].append(len(ids))
            out["_n_target"].append(sum(label != IGNORE_INDEX for label in labels))
        return out

    def _render(self, row: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The row's full text and its target character spans."""
        s, eos = self.settings, self.tokenizer.eos_token
        if self.fmt == "text":
            text = _text(row.get(s["text_field"]), s["text_field"])
            text = text if text.endswith(eos) else text + eos
            return text, [(0, len(text))]
        if self.fmt == "instruction":
            prompt = _text(row.get(s["prompt_field"]), s["prompt_field"])
            response = _text(row.get(s["response_field"]), s["response_field"])
            extra = row.get(s["input_field"]) if s["input_field"] else None
            if extra is not None and not (isinstance(extra, str) and not extra.strip()):
                extra = _text(extra, s["input_field"])  # optional: empty is fine, a list is not
            if extra and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            if self.chat:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                return self._chat(_with_system(messages, s["system_prompt"]))
            prefix = _instruction_prefix(prompt, s["prompt_template"], s["system_prompt"])
            text = prefix + response + eos
            return text, [(len(prefix), len(text))]
        messages = _messages(row.get(s["messages_field"]), s["messages_field"])
        return self._chat(_with_system(messages, s["system_prompt"]))

    def _chat(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """Render a conversation; each assistant turn's content and end-of-turn token is a target span.

        A turn's span is found by rendering the conversation up to it with the generation prompt and
        up to its end: the first must be a prefix of the second, and both of the full text.
        """
        eos = self.tokenizer.eos_token
        try:
            full = self._apply(messages)
            spans = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = self._apply(messages[:i], generation_prompt=True) if i else ""
                upto = self._apply(messages[: i + 1])
                if not (upto.startswith(before) and full.startswith(upto)):
                    raise DataError(
                        "the tokenizer's chat template renders a conversation differently from its prefixes "
                        "(it may rewrite earlier turns), so the assistant turns cannot be located: use a "
                        "tokenizer with a plain template (model.tokenizer), or set data.train_on_prompt=true"
                    )
                turn = upto[len(before) :]
                # Stop after the EOS the turn ends with, not at the template's trailing newline; a template
                # whose end-of-turn is not EOS (Gemma's <end_of_turn>) keeps its own marker.
                at = turn.rfind(eos)
                end = len(before) + (at + len(eos) if at >= 0 else len(turn.rstrip()))
                spans.append((len(before), end))
        except TemplateError as e:  # templates raise on conversations they reject (roles not alternating)
            raise _InvalidRow(f"a conversation the chat template rejected ({e})") from e
        return full, spans

    def _apply(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _labels(
        self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> list[int]:
        if self.settings["train_on_prompt"]:
            return list(ids)
        labels = []
        for token, (start, end) in zip(ids, offsets, strict=True):
            # Tokens the tokenizer adds itself (BOS) have empty spans and are never targets.
            target = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
            labels.append(token if target else IGNORE_INDEX)
        return labels


# ---------------------------------------------------------------------------------------------- building


# How a drop that is not about the row's fields reads in the summary.
_DROP_REASONS = {"too_long": "longer than data.max_length", "no_target": "with no target tokens within data.max_length"}
_MAX_REASONS_SHOWN = 6


@dataclass
class _Counts:
    rows: int = 0
    empty: int = 0
    too_long: int = 0
    no_target: int = 0
    truncated: int = 0
    reasons: dict[str, tuple[int, str]] = field(default_factory=dict)  # why -> (rows, first one: "row 17")

    def add(self, other: _Counts) -> None:
        for name in ("rows", "empty", "too_long", "no_target", "truncated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for why, (n, example) in other.reasons.items():
            before, first = self.reasons.get(why, (0, example))
            self.reasons[why] = (before + n, first)


def _reason_lines(reasons: dict[str, tuple[int, str]]) -> list[str]:
    """'3 with an empty 'output' (e.g. row 17)', most frequent first."""
    ranked = sorted(reasons.items(), key=lambda item: -item[1][0])
    out = [f"{n} {why} (e.g. {example})" for why, (n, example) in ranked[:_MAX_REASONS_SHOWN]]
    if len(ranked) > _MAX_REASONS_SHOWN:
        rest = ranked[_MAX_REASONS_SHOWN:]
        out.append(f"{sum(n for _, (n, _) in rest)} for {len(rest)} other reasons")
    return out


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) so rows can end")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("label masking needs a fast tokenizer (offset mappings): load it with use_fast=True")


def encode_split(
    ds: datasets.Dataset, cfg: DataConfig, encoder, features: datasets.Features, split: str, first: bool,
    what: str = "split",
) -> tuple[datasets.Dataset, _Counts]:
    """Tokenize and label `ds` with `encoder` (a batched map function giving input and why-dropped
    columns), drop the rows that cannot be trained on, and count them by reason."""
    mapped = ds.map(
        encoder,
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=cfg.num_proc,
        desc=f"tokenizing {what} {split!r}",
    )
    drops = Counter(mapped["_drop"])
    reasons: dict[str, tuple[int, str]] = {}
    if len(drops) > 1 or "" not in drops:
        # Rows are numbered from 1 as they stand in the split (a .jsonl line, without blank lines).
        where = "" if first else f" of split {split!r}"
        for i, (drop, why) in enumerate(zip(mapped["_drop"], mapped["_why"], strict=True)):
            if drop:
                reason = f"with {why}" if drop == "empty" else _DROP_REASONS[drop]
                detail = f", {why}" if drop == "too_long" else ""
                n, example = reasons.get(reason, (0, f"row {i + 1}{where}{detail}"))
                reasons[reason] = (n + 1, example)
    kept = mapped.filter(lambda drop: drop == "", input_columns="_drop", num_proc=cfg.num_proc)
    counts = _Counts(
        rows=len(ds),
        empty=drops["empty"],
        too_long=drops["too_long"],
        no_target=drops["no_target"],
        truncated=sum(kept["_truncated"]),
        reasons=reasons,
    )
    return kept, counts


def raw_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train split and the eval split (if data.eval_split names one), cut to data.max_samples."""
    raw = load_raw(cfg)
    train_raw = _split(raw, cfg.split, "split", cfg.path)
    eval_raw = _split(raw, cfg.eval_split, "eval_split", cfg.path) if cfg.eval_split else None
    if cfg.max_samples is not None:
        train_raw = train_raw.select(range(min(cfg.max_samples, len(train_raw))))
        if eval_raw is not None:
            eval_raw = eval_raw.select(range(min(cfg.max_samples, len(eval_raw))))
    return train_raw, eval_raw


def encoded_splits(
    cfg: DataConfig, train_raw: datasets.Dataset, eval_raw: datasets.Dataset | None,
    encode: Callable[[datasets.Dataset, str, bool], tuple[datasets.Dataset, _Counts]],
    require_columns: Callable[[Sequence[str], str], None], seed: int, unit: str = "rows",
) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Encode the train split and the eval split (or hold out data.eval_fraction of train), and report
    the counts; `encode(ds, split, first)` is encode_split with the format's encoder."""
    train, counts = encode(train_raw, cfg.split, True)
    if len(train) == 0:
        raise _nothing_left(cfg, cfg.split, counts)
    evaluation = None
    if eval_raw is not None:
        require_columns(eval_raw.column_names, f"split {cfg.eval_split!r}")
        evaluation, eval_counts = encode(eval_raw, cfg.eval_split, False)
        if len(evaluation) == 0:
            raise _nothing_left(cfg, cfg.eval_split, eval_counts)
        counts.add(eval_counts)
    elif cfg.eval_fraction > 0:
        if len(train) < 2:
            raise DataError(
                f"data.eval_fraction={cfg.eval_fraction} needs at least 2 {unit}, {len(train)} left; "
                "set data.eval_fraction=0"
            )
        held_out = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, evaluation = held_out["train"], held_out["test"]

    report = DataReport(
        rows=counts.rows,
        kept=len(train) + (len(evaluation) if evaluation is not None else 0),
        dropped_empty=counts.empty,
        dropped_too_long=counts.too_long,
        dropped_no_target=counts.no_target,
        truncated=counts.truncated,
        drop_reasons=counts.reasons,
        train_rows=len(train),
        eval_rows=len(evaluation) if evaluation is not None else 0,
        train_tokens=sum(train["_n_tokens"]),
        target_tokens=sum(train["_n_target"]),
    )
    train = train.remove_columns(_HELPER_COLUMNS)
    if evaluation is not None:
        evaluation = evaluation.remove_columns(_HELPER_COLUMNS)
    return train, evaluation, report

def _nothing_left(cfg: DataConfig, split: str, counts: _Counts) -> DataError:
    if counts.rows == 0:
        return DataError(f"split {split!r} of {cfg.path} has no rows")
    fixes = []
    if counts.empty:
        fixes.append("check the data.*_field settings name the right columns")
    if counts.too_long:
        fixes.append(f"raise data.max_length={cfg.max_length} or set data.length_policy=truncate")
    if counts.no_target:
        fixes.append(f"raise data.max_length={cfg.max_length} (the prompt fills it) or add an assistant turn")
    return DataError(
        f"all {counts.rows} rows of split {split!r} of {cfg.path} were dropped:\n  - "
        + "\n  - ".join(_reason_lines(counts.reasons))
        + "\n" + "; ".join(fixes)
    )


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Load, render, tokenize and label the train (and eval) data described by `cfg`."""
    _check_tokenizer(tokenizer)
    train_raw, eval_raw = raw_splits(cfg)
    fmt = resolve_format(cfg, train_raw.column_names)
    encoder = _Encoder(cfg, tokenizer, fmt)
    train, evaluation, report = encoded_splits(
        cfg, train_raw, eval_raw,
        lambda ds, split, first: encode_split(ds, cfg, encoder, _FEATURES, split, first),
        lambda columns, what: _require_columns(cfg, fmt, columns, what), seed,
    )
    if cfg.packing:
        train = pack(train, cfg.max_length)
        evaluation = pack(evaluation, cfg.max_length) if evaluation is not None else None
        report.packed_rows, report.packed_fill = len(train), fill_ratio(train, cfg.max_length)
    return PreparedData(train=train, eval=evaluation, report=report, format=fmt)


# ---------------------------------------------------------------------------------------------- batching


class Collator:
    """Right-pads a list of {input_ids, labels} rows into LongTensors; padded labels are IGNORE_INDEX.

    `widths` (ascending) are the only widths a batch may have: it is padded to the smallest one that
    holds its longest row (compiled blocks compile once per width). A row longer than all of them
    keeps its own width; nothing is ever cut here.
    """

    def __init__(self, pad_token_id: int, widths: Sequence[int] | None = None):
        if pad_token_id is None:
            raise DataError("the collator needs a pad_token_id; tokenizers without one usually pad with eos")
        if widths is not None and (not widths or min(widths) <= 0):
            raise DataError(f"widths must be positive batch widths or None (got {widths})")
        self.pad_token_id = pad_token_id
        self.widths = sorted(widths) if widths else None

    def __call__(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise DataError("cannot collate an empty batch")
        lengths = [len(r["input_ids"]) for r in rows]
        for r, n in zip(rows, lengths, strict=True):
            if len(r["labels"]) != n:
                raise DataError(f"a row has {n} input_ids but {len(r['labels'])} labels")
        width = max(lengths)
        if self.widths:
            width = next((w for w in self.widths if w >= width), width)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        packed = "position_ids" in rows[0]
        # Packed rows: the padding gets positions 0, 1, ... so it reads as one more (unlabelled) example.
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1) if packed else None
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
                position_ids[i, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids  # the model gets these instead of the attention mask
        return batch
