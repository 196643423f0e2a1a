"""`python -m finetune.generate adapter=RUN_DIR prompt="..."`: load a saved adapter onto its quantized base and generate.

Keys: adapter (a run folder or an adapter folder), prompt (repeatable), max_new_tokens (default
64), sample (false: greedy), temperature (0.7). The prompt is rendered exactly as during training.
"""

from __future__ import annotations

import sys

import torch

from finetune.config import suggest_key

KEYS = {"adapter": None, "prompt": None, "max_new_tokens": "64", "sample": "false", "temperature": "0.7"}


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """key=value arguments; `prompt` may repeat. Unknown keys fail with the key that was meant."""
    values, prompts, problems = {k: v for k, v in KEYS.items() if v is not None}, [], []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"'{item}' is not key=value (keys: {', '.join(KEYS)})")
        elif key == "prompt":
            prompts.append(value)
        elif key not in KEYS:
            hint = suggest_key(key, list(KEYS))
            problems.append(f"unknown key '{key}'" + (f": did you mean '{hint}'?" if hint else f"; keys: {', '.join(KEYS)}"))
        else:
            values[key] = value
    if "adapter" not in values:
        problems.append("adapter=RUN_DIR is required (the run folder printed at the end of training)")
    if not prompts:
        problems.append("give at least one prompt=\"...\"")
    if problems:
        raise SystemExit("finetune.generate: " + "\n  ".join(["bad arguments:", *problems]))
    return values, prompts


def main(argv: list[str] | None = None) -> None:
    from finetune.checkpoint import CheckpointError
    from finetune.data import load_raw, resolve_format
    from finetune.loop import generate
    from finetune.model import load_adapter

    values, prompts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, tokenizer, cfg = load_adapter(values["adapter"])
    except CheckpointError as e:
        raise SystemExit(f"finetune.generate: {e}") from None
    fmt = cfg.data.format
    if fmt == "auto":  # the format training resolved from the data's columns
        fmt = resolve_format(cfg.data, load_raw(cfg.data)[cfg.data.split].column_names)
    sampling = {"do_sample": values["sample"].lower() in ("1", "true", "yes")}
    if sampling["do_sample"]:
        sampling["temperature"] = float(values["temperature"])
    for prompt in prompts:
        with torch.no_grad():
            text = generate(model, tokenizer, cfg, prompt, fmt, int(values["max_new_tokens"]), **sampling)
        print(f"prompt: {prompt}\n{text}\n", flush=True)


if __name__ == "__main__":
    main()
