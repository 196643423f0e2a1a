"""The one-screen summaries printed at the start and the end of a run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import torch

from finetune.config import Config
from finetune.quant import describe


def _rule(title: str) -> str:
    return f"\n{'=' * 20} {title} {'=' * max(4, 58 - len(title))}"


def describe_speed(cfg: Config) -> str:
    """The speed settings in effect, in words, for the start summary."""
    s, checkpointing = cfg.speed, cfg.train.gradient_checkpointing
    parts = ["compiled blocks" + (" replayed as CUDA graphs" if s.cuda_graphs else "") if s.compile else "eager blocks"]
    if checkpointing and s.blocks_without_checkpointing:
        parts.append(f"the last {s.blocks_without_checkpointing} blocks without checkpointing")
    # as finetune/footprint.py counts it: lora.modules_to_save may train the head whole, and a trainable
    # head takes the full logits (finetune/loss.py)
    chunked = s.loss_chunk_size and not cfg.lora.modules_to_save
    parts.append(f"loss in chunks of {s.loss_chunk_size} tokens" if chunked else "full logits")
    if s.mlp_chunk_size:
        parts.append(f"MLPs in slices of {s.mlp_chunk_size} tokens")
    if not s.fp32_frozen:
        parts.append("frozen unquantized weights in the compute dtype")
    if s.fused_lora:
        parts.append("LoRA in fused Triton kernels")
    if s.fp8_frozen_matmuls:
        parts.append("frozen 4-bit matmuls in FP8")
    host = (["checkpointed block inputs"] if s.offload_checkpoints and checkpointing else []) + \
        (["input embeddings"] if s.offload_embeddings else [])
    if host:
        parts.append("kept in CPU memory: " + " and ".join(host))
    return ", ".join(parts)


def print_start(
    cfg: Config, *, source: str, footprint: int, trainable: int, total: int, data, world_size: int,
    device: torch.device, mixed_precision: str, run_dir: Path, strategy: str = "single process",
) -> None:
    t = cfg.train
    global_batch = t.batch_size * t.grad_accum * world_size
    lines = [
        _rule("finetune: start"),
        f"model        {cfg.model.name_or_path}" + (f"  ({source})" if source != cfg.model.name_or_path else "")
        + ("  [random weights]" if cfg.model.random_init else ""),
        f"quant        {describe(cfg.quant)}",
        f"footprint    {footprint / 2**20:,.1f} MiB (get_memory_footprint of the quantized base)",
        f"trainable    {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)  "
        f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}",
        f"data         {cfg.data.path} as {data.format}",
        *[f"             {line}" for line in data.report.lines()],
        f"processes    {world_size} ({strategy})",
        f"steps        {t.max_steps} x {global_batch} rows (global batch: {t.batch_size} per rank x accum "
        f"{t.grad_accum} x {world_size} rank(s)), lr {t.lr:g} {t.lr_scheduler}, optimizer {t.optimizer}",
        f"device       {device}, mixed precision {mixed_precision}, "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        f"speed        {describe_speed(cfg)}",
        f"output       {run_dir}",
        "=" * 80,
    ]
    print("\n".join(lines), flush=True)


def print_end(summary: dict) -> None:
    evals = summary["eval_loss"]
    eval_line = (
        f"eval loss    {evals[0][1]:.4f} (step {evals[0][0]}) -> {evals[-1][1]:.4f} (step {evals[-1][0]})"
        + (f", perplexity {perplexity(evals[0][1]):.2f} -> {perplexity(evals[-1][1]):.2f}"
           if summary.get("objective", "sft") == "sft" else "")
        if evals else "eval loss    (no eval split: set data.eval_fraction or data.eval_split)"
    )
    lines = [_rule("finetune: done")]
    for (prompt, before), (_, after) in zip(summary["samples_before"], summary["samples_after"]):
        lines += [f"prompt       {prompt!r}", f"  before     {before!r}", f"  after      {after!r}"]
    first, final = summary["first_loss"], summary["final_loss"]
    lines += [
        f"train loss   {first:.4f} (first step) -> {final:.4f} (step {summary['steps']})"
        if first is not None else "train loss   (no step completed)",
        eval_line,
        *_preference_lines(summary),
        _throughput_line(summary),
        f"peak memory  {summary['peak_memory_gib']:.2f} GiB ({summary['peak_memory_kind']})",
        f"adapter      {summary['adapter_dir']}",
        f"curves       {summary['curves']} (loss, eval loss, learning rate, tokens/s over steps)",
        f"load it      python -m finetune.generate adapter={Path(summary['adapter_dir']).parent} prompt='...'",
        "=" * 80,
    ]
    if summary["skipped_nonfinite_steps"]:
        lines.insert(-1, f"skipped      {summary['skipped_nonfinite_steps']} step(s) with a non-finite loss")
    print("\n".join(lines), flush=True)


def perplexity(loss: float) -> float:
    """exp of a mean next-token loss; inf where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def _preference_lines(summary: dict) -> list[str]:
    """DPO/ORPO: how the last step separated the chosen replies from the rejected ones."""
    last = summary["history"][-1][1] if summary.get("history") else {}
    if "rewards/accuracies" not in last:
        return []
    return [f"rewards      accuracy {last['rewards/accuracies']:.0%}, margin {last['rewards/margins']:.4f} "
            f"(chosen {last['rewards/chosen']:.4f}, rejected {last['rewards/rejected']:.4f}; last step)"]


def _throughput_line(summary: dict) -> str:
    steady = summary.get("steady_tokens_per_s")
    rate = f"{summary['tokens_per_s']:,.0f} tokens/s"
    if steady:  # compiles, CUDA graph recording and cache warm-up are not the rate the run sustains
        recorded = summary.get("cuda_graphs_record_seconds")
        rate = (f"{steady:,.0f} tokens/s steady state, after {summary['compile_warmup_steps']} warm-up step(s) of "
                f"{summary['compile_warmup_seconds']:.1f} s"
                + (f" and CUDA graphs recorded in {recorded:.1f} s before the first" if recorded else "")
                + f" ({summary['tokens_per_s']:,.0f} tokens/s over every step)")
    return (f"throughput   {rate}; {summary['tokens']:,} tokens in {summary['train_seconds']:.1f} s of training, "
            f"{summary['wall_seconds']:.0f} s wall")


class Throughput:
    """One launch's step times, split into warm-up and the steady state the run sustains.

    Warm-up is the first step plus every following step slower than twice the median of the
    recent steps: compiles (speed.compile, one per new batch width), CUDA graph recording and
    cache warm-up. The steady-state rate counts the steps after it.
    """

    RECENT = 100  # steps the median is taken over: the recent ones are the steady state

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.seconds: list[float] = []

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens.append(tokens)
        self.seconds.append(seconds)

    def warmup_steps(self) -> int:
        if not self.seconds:
            return 0
        typical = statistics.median(self.seconds[-self.RECENT:])
        n = 1
        while n < len(self.seconds) and self.seconds[n] > 2 * typical:
            n += 1
        return n

    def tokens_per_s(self) -> float:
        seconds = sum(self.seconds)
        return sum(self.tokens) / seconds if seconds > 0 else 0.0

    def steady_tokens_per_s(self) -> Optional[float]:
        """Tokens/s after the warm-up; None until a step after it is done."""
        n = self.warmup_steps()
        seconds = sum(self.seconds[n:])
        return sum(self.tokens[n:]) / seconds if seconds > 0 else None

    def summary(self) -> dict:
        n = self.warmup_steps()
        return {"steady_tokens_per_s": self.steady_tokens_per_s(), "compile_warmup_steps": n,
                "compile_warmup_seconds": sum(self.seconds[:n])}
