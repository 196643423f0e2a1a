"""Generate with a model and its adapters, and `python -m finetune.generate adapter=RUN_DIR prompt="..."`.

The CLI loads a saved adapter onto its quantized base. Keys: adapter (a run folder or an adapter
folder), prompt (repeatable), max_new_tokens (default 64), sample (false: greedy), temperature (0.7).
A prompt is rendered and tokenized exactly as a training prompt is. Nothing here imports training.
"""

from __future__ import annotations

import sys

import torch

from finetune.cli import fail, parse_key_values
from finetune.config import DataConfig, SampleConfig
from finetune.data import encode_prompt


@torch.no_grad()
def generate(model, tokenizer, data_cfg: DataConfig, prompt: str, fmt: str, max_new_tokens: int, **sampling) -> str:
    """A completion of `prompt`, rendered and tokenized exactly as training prompts are."""
    ids = torch.tensor([encode_prompt(data_cfg, tokenizer, prompt, fmt)], device=next(model.parameters()).device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        use_cache=True, pad_token_id=tokenizer.pad_token_id, **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_samples(model, tokenizer, data_cfg: DataConfig, sample: SampleConfig, fmt: str) -> list[tuple[str, str]]:
    """Greedy completions of `sample.prompts`, to show what the adapter changed."""
    was_training = model.training
    model.eval()
    # Eagerly, also with speed.compile: each decoding step with a KV cache would be another compile
    # of the blocks, and past dynamo's recompile limit the training steps would run uncompiled.
    with torch.compiler.set_stance("force_eager"):
        samples = [
            (prompt, generate(model, tokenizer, data_cfg, prompt, fmt, sample.max_new_tokens, do_sample=False))
            for prompt in sample.prompts
        ]
    if was_training:
        model.train()
    return samples

KEYS = {"adapter": None, "prompt": None, "max_new_tokens": "64", "sample": "false", "temperature": "0.7"}


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """key=value arguments; `prompt` may repeat. Unknown keys fail with the key that was meant."""
    values, lists, problems = parse_key_values(argv, KEYS, repeated=("prompt",))
    prompts = lists["prompt"]
    if "adapter" not in values:
        problems.append("adapter=RUN_DIR is required (the run folder printed at the end of training)")
    if not prompts:
        problems.append("give at least one prompt=\"...\"")
    if problems:
        fail("generate", "\n  ".join(["bad arguments:", *problems]))
    return values, prompts


def main(argv: list[str] | None = None) -> None:
    from finetune.adapter import load_adapter
    from finetune.atomic import CheckpointError
    from finetune.data import load_raw, resolve_format

    values, prompts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, tokenizer, cfg = load_adapter(values["adapter"])
    except CheckpointError as e:
        fail("generate", str(e))
    fmt = cfg.data.format
    if fmt == "auto":  # the format training resolved from the data's columns
        fmt = resolve_format(cfg.data, load_raw(cfg.data)[cfg.data.split].column_names)
    sampling = {"do_sample": values["sample"].lower() in ("1", "true", "yes")}
    if sampling["do_sample"]:
        sampling["temperature"] = float(values["temperature"])
    for prompt in prompts:
        with torch.no_grad():
            text = generate(model, tokenizer, cfg.data, prompt, fmt, int(values["max_new_tokens"]), **sampling)
        print(f"prompt: {prompt}\n{text}\n", flush=True)


if __name__ == "__main__":
    main()
