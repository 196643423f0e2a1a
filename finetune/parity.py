"""The parity report of a merge: does the merged model answer like the adapter it came from?

On a set of prompts (the run's eval rows, rendered and tokenized as training renders them) the
merged model is compared with the adapter on the quantized base (what was trained) and with the
adapter on the 16-bit base: max and mean |logit difference|, KL divergence, top-1 agreement, and
greedy generations side by side. The comparison that the merge target promises (base=dequantized:
the adapter on the quantized base; base=original: the adapter on the 16-bit base) must hold: its
KL divergence must be small against what the adapter itself changes (the KL between the adapter
and its base without the adapter), else the merge is wrong (a bad LoRA scaling, a forgotten
modules_to_save) and the report fails with the reason.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

# A correct merge differs from its target only by rounding to the output dtype; that noise must stay
# below this fraction of the adapter's own effect (KL of the adapter against its bare base).
MAX_KL_FRACTION_OF_EFFECT = 0.2
# Above this mean KL (nats per token) a merge is wrong whatever the adapter's effect.
MAX_KL = 0.05
# Below this adapter effect (mean KL) the fraction test cannot tell a merge bug from rounding.
MIN_EFFECT = 1e-4
MIN_TOP1 = 0.9
# Top-1 agreement is judged where the reference's top token leads its second by this many logits:
# where two tokens are near-tied, rounding alone can swap them (a near-uniform model, such as one
# with random weights, is near-tied everywhere).
DECIDED_MARGIN = 1.0
# With fewer decided positions than this, top-1 agreement is reported but not judged.
MIN_DECIDED = 16
GENERATIONS = 3
NEW_TOKENS = 24
FALLBACK_PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 3?"]


class ParityError(RuntimeError):
    """The merged model does not answer like the adapter; `failures` say how."""

    def __init__(self, failures: list[str], report_path: Path):
        super().__init__("; ".join(failures))
        self.failures, self.report_path = failures, report_path


def _format(cfg) -> str:
    from finetune.data import load_raw, resolve_format

    fmt = cfg.data.format
    if fmt == "auto":  # the format training resolved from the data's columns
        fmt = resolve_format(cfg.data, load_raw(cfg.data)[cfg.data.split].column_names)
    return fmt


def parity_rows(cfg, tokenizer, prompts: Optional[list[str]], rows: int) -> tuple[list[list[int]], list[int], str]:
    """(token rows, prompt length of each row, where they came from).

    Eval rows are whole examples (prompt and answer) so the logits of the answer tokens are compared
    too; their prompt part is what generation starts from. Given prompts are rendered as training does.
    """
    from finetune.data import build_datasets, encode_prompt

    if prompts is None:
        try:
            data = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        except Exception:  # the run's data may be gone; the sample prompts still measure parity
            data = None
        if data is not None and data.eval is not None and len(data.eval) > 0:
            ids = [list(r) for r in data.eval["input_ids"][:rows]]
            labels = data.eval["labels"][:rows]
            starts = [next((i for i, lab in enumerate(lb) if lab != -100), len(lb)) for lb in labels]
            return ids, [max(1, s) for s in starts], f"{len(ids)} eval rows of {cfg.data.path}"
        prompts = list(cfg.sample.prompts) or FALLBACK_PROMPTS
        where = "sample.prompts" if cfg.sample.prompts else "built-in sample prompts"
    else:
        where = "given prompts"
    fmt = _format(cfg)
    ids = [encode_prompt(cfg.data, tokenizer, p, fmt) for p in prompts[:rows]]
    return ids, [len(r) for r in ids], f"{len(ids)} {where}"


@torch.no_grad()
def model_outputs(model, rows: list[list[int]], starts: list[int], pad_id: int) -> dict[str, Any]:
    """Each row's logits (fp32, on the CPU) and greedy continuations of the first rows' prompts."""
    device = next(model.parameters()).device
    logits = [model(input_ids=torch.tensor([r], device=device)).logits[0].float().cpu() for r in rows]
    generations = []
    for r, s in list(zip(rows, starts))[:GENERATIONS]:
        ids = torch.tensor([r[:s]], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=pad_id)
        generations.append(out[0, s:].tolist())
    return {"logits": logits, "generations": generations}


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """max/mean |logit difference|, mean KL(reference || other) per token, top-1 agreement (over every
    position, and over the positions where the reference's top token leads by DECIDED_MARGIN)."""
    ref, oth = torch.cat(reference), torch.cat(other)
    diff = (ref - oth).abs()
    ref_logp, oth_logp = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
    kl = (ref_logp.exp() * (ref_logp - oth_logp)).sum(-1)
    agree = ref.argmax(-1) == oth.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= DECIDED_MARGIN
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "kl": float(kl.mean()),
        "top1_agreement": float(agree.float().mean()),
        "decided_positions": int(decided.sum()),
        "top1_agreement_decided": float(agree[decided].float().mean()) if decided.any() else float("nan"),
        "finite": bool(torch.isfinite(oth).all()),
    }


def _free() -> None:
    """Return the memory of the models the caller has just deleted, so the next one loads into it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sixteen_bit_cfg(cfg):
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mode="none", int8_skip_modules=None))


def parity_report(
    merged_dir: Path,
    adapter_dir: Path,
    cfg,
    source: str,
    *,
    base: str,
    prompts: Optional[list[str]] = None,
    rows: int = 8,
    log: Callable[[str], None] = print,
    device: Optional[torch.device] = None,
) -> dict[str, Any]:
    """Compare the merged model at `merged_dir` with the adapter on both bases, each loaded on `device`
    in turn; returns the report (with "failures", empty when the merge is sound, and "table", the printed text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.adapter import load_adapter
    from finetune.model import load_base
    from finetune.source import load_tokenizer

    device = device or torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model, source)
    ids, starts, where = parity_rows(cfg, tokenizer, prompts, rows)
    pad = tokenizer.pad_token_id
    log(f"[parity] comparing on {where} ...")

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), device_map={"": device})
    merged.eval()
    outs = {"merged": model_outputs(merged, ids, starts, pad)}
    del merged
    _free()

    quant_mode = cfg.quant.mode
    if quant_mode != "none":
        adapted, _, _ = load_adapter(adapter_dir, device=device)
        outs["adapter_quantized"] = model_outputs(adapted, ids, starts, pad)
        if base == "dequantized":
            with adapted.disable_adapter():
                outs["bare_base"] = model_outputs(adapted, ids, starts, pad)
        del adapted
        _free()
    sixteen_bit = _sixteen_bit_cfg(cfg)
    plain = load_base(sixteen_bit.model, sixteen_bit.quant, source, device)
    adapted16 = PeftModel.from_pretrained(plain, str(adapter_dir))
    adapted16.eval()
    outs["adapter_16bit"] = model_outputs(adapted16, ids, starts, pad)
    if "bare_base" not in outs:
        with adapted16.disable_adapter():
            outs["bare_base"] = model_outputs(adapted16, ids, starts, pad)
    del adapted16, plain
    _free()

    target = "adapter_quantized" if base == "dequantized" else "adapter_16bit"
    comparisons = {
        f"merged vs {name}": compare(outs[name]["logits"], outs["merged"]["logits"])
        for name in ("adapter_quantized", "adapter_16bit") if name in outs
    }
    effect = compare(outs[target]["logits"], outs["bare_base"]["logits"])
    comparisons[f"adapter effect: {target} vs its base without adapter"] = effect
    promised = comparisons[f"merged vs {target}"]
    failures = []
    if not promised["finite"]:
        failures.append("the merged model's logits hold NaN or inf")
    if promised["kl"] > MAX_KL:
        failures.append(f"KL(merged || {target}) = {promised['kl']:.4g} nats/token, above {MAX_KL}")
    if effect["kl"] >= MIN_EFFECT and promised["kl"] > MAX_KL_FRACTION_OF_EFFECT * effect["kl"]:
        failures.append(
            f"the merged model is {promised['kl'] / effect['kl']:.0%} as far from {target} (KL {promised['kl']:.4g}) as the "
            f"adapter is from its base (KL {effect['kl']:.4g}); a sound merge stays below {MAX_KL_FRACTION_OF_EFFECT:.0%} "
            "(a wrong LoRA scaling, a missing modules_to_save or the wrong base)"
        )
    decided, agreement = promised["decided_positions"], promised["top1_agreement_decided"]
    if effect["kl"] >= MIN_EFFECT and decided >= MIN_DECIDED and agreement < MIN_TOP1:
        failures.append(f"top-1 agreement with {target} is {agreement:.1%} where {target} is decided (its top token "
                        f"leads by {DECIDED_MARGIN:g}+ logits: {decided} positions), below {MIN_TOP1:.0%}")
    notes = []
    if decided < MIN_DECIDED:
        notes.append(f"top-1 agreement not judged: {target}'s top token leads its second by {DECIDED_MARGIN:g}+ logits at "
                     f"only {decided} positions (a near-uniform model, e.g. random weights), where rounding alone can "
                     "swap near-tied tokens; the KL checks still apply")
    if effect["kl"] < MIN_EFFECT:
        notes.append(f"the adapter changes the model very little (KL {effect['kl']:.2g}): the relative check cannot tell "
                     "a merge bug from rounding")
    generations = [
        {"prompt": tokenizer.decode(ids[i][:starts[i]]),
         **{name: tokenizer.decode(o["generations"][i], skip_special_tokens=True) for name, o in outs.items()}}
        for i in range(min(GENERATIONS, len(ids)))
    ]
    report: dict[str, Any] = {
        "base": base, "target": target, "rows": where, "tokens": sum(len(r) for r in ids),
        "comparisons": comparisons, "generations": generations, "failures": failures, "notes": notes,
        "thresholds": {"max_kl": MAX_KL, "max_kl_fraction_of_effect": MAX_KL_FRACTION_OF_EFFECT,
                       "min_top1": MIN_TOP1, "min_effect": MIN_EFFECT, "decided_margin": DECIDED_MARGIN,
                       "min_decided": MIN_DECIDED},
    }
    report["table"] = format_table(report)
    log(report["table"])
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"parity ({report['rows']}, {report['tokens']} tokens; the merge promises to match {report['target']})",
             f"{'comparison':<62} {'max|dlogit|':>11} {'mean|dlogit|':>12} {'KL':>10} {'top-1':>7} "
             f"{'top-1 decided':>17}"]
    for name, c in report["comparisons"].items():
        decided = f"{c['top1_agreement_decided']:.1%} of {c['decided_positions']}" if c["decided_positions"] else "-"
        lines.append(f"{name:<62} {c['max_abs_logit_diff']:>11.4f} {c['mean_abs_logit_diff']:>12.5f} "
                     f"{c['kl']:>10.2e} {c['top1_agreement']:>7.1%} {decided:>17}")
    for g in report["generations"]:
        lines.append(f"prompt: {g['prompt']!r}")
        for name, text in g.items():
            if name != "prompt":
                lines.append(f"  {name:<18} {text!r}")
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append("FAILED: " + "; ".join(report["failures"]) if report["failures"] else "parity: OK")
    return "\n".join(lines)
