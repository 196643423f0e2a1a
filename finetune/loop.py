"""The training loop: one function, read top to bottom.

Built on `accelerate.Accelerator` for device placement, mixed precision and multi-GPU, with the
gradient accumulation written out by hand so that the loss of a step is the mean over every target
token of the step (all micro-batches, all processes), not a mean of per-batch means.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from finetune import report
from finetune.checkpoint import (
    TrainState,
    adapter_manifest,
    check_resumable,
    disk_errors,
    load_checkpoint,
    restore_rng,
    save_adapter,
    save_checkpoint,
    write_json_atomic,
)
from finetune.config import Config, ConfigError, SpeedConfig
from finetune.data import Collator, build_datasets, encode_prompt
from finetune.fingerprint import run_fingerprint
from finetune.loss import causal_lm_loss_sum, count_targets
from finetune.model import (
    batch_width_multiple,
    compile_blocks,
    count_parameters,
    load_base,
    load_tokenizer,
    prepare_for_training,
)
from finetune.sampler import EpochBatches
from finetune.signals import StopSignals


@dataclass
class RunResult:
    summary: dict  # what the end-of-run screen shows (main process only; empty elsewhere)
    model: object  # the trained PeftModel, unwrapped from accelerate
    tokenizer: object


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why."""


def mixed_precision(cfg: Config) -> str:
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[cfg.quant.compute_dtype]


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        params = list(params)
        # PyTorch's fused AdamW: the same update in one kernel launch for all adapter tensors (an
        # 8B model with all-linear LoRA has ~450 of them). It wants them all on one CUDA or CPU
        # device; adapters split between the GPU and CPU offload take the multi-tensor path.
        fused = len({p.device for p in params}) == 1 and params[0].device.type in ("cuda", "cpu")
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def sustained_tokens_per_s(state: TrainState, after_first_step: Optional[tuple[int, float]]) -> Optional[float]:
    """Tokens/s over this launch's steps after its first one; None until there is such a step."""
    if after_first_step is None:
        return None
    seconds = state.train_seconds - after_first_step[1]
    return (state.tokens_seen - after_first_step[0]) / seconds if seconds > 0 else None


@torch.no_grad()
def evaluate(model, batches, accelerator: Accelerator, speed: SpeedConfig) -> float:
    """Mean loss per target token over the eval batches, across every process."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            totals[0] += causal_lm_loss_sum(model, batch, speed.loss_chunk_size, speed.compile).double()
        totals[1] += count_targets(batch)
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


@torch.no_grad()
def generate(model, tokenizer, cfg: Config, prompt: str, fmt: str, max_new_tokens: int, **sampling) -> str:
    """A completion of `prompt`, rendered and tokenized exactly as training prompts are."""
    ids = torch.tensor([encode_prompt(cfg.data, tokenizer, prompt, fmt)], device=next(model.parameters()).device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        use_cache=True, pad_token_id=tokenizer.pad_token_id, **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_samples(model, tokenizer, cfg: Config, fmt: str) -> list[tuple[str, str]]:
    """Greedy completions of `sample.prompts`, to show what the adapter changed."""
    was_training = model.training
    model.eval()
    # Eagerly, also with speed.compile: each decoding step with a KV cache would be another compile
    # of the blocks, and past dynamo's recompile limit the training steps would run uncompiled.
    with torch.compiler.set_stance("force_eager"):
        samples = [
            (prompt, generate(model, tokenizer, cfg, prompt, fmt, cfg.sample.max_new_tokens, do_sample=False))
            for prompt in cfg.sample.prompts
        ]
    if was_training:
        model.train()
    return samples


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


def train(cfg: Config, source: str, run_dir: Path, resume_from: Optional[Path] = None) -> RunResult:
    """Fine-tune LoRA adapters on the quantized base at `source`; return the end summary.

    `resume_from` is a complete checkpoint (checkpoint.resolve_resume) to go on from exactly.
    SIGTERM/SIGINT stop the run at the end of the current step with a checkpoint (exit 128 + signal).
    """
    with StopSignals() as stop:
        return _train(cfg, source, run_dir, resume_from, stop)


def _train(cfg: Config, source: str, run_dir: Path, resume_from: Optional[Path], stop: StopSignals) -> RunResult:
    t = cfg.train
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg),
        log_with="wandb" if cfg.log.wandb else None,
        project_dir=str(run_dir),
    )
    set_seed(t.seed)  # python, numpy, torch and CUDA generators, on every process
    device, is_main = accelerator.device, accelerator.is_main_process
    started = time.perf_counter()

    # 1. Tokenizer and data first: bad data fails in seconds, before the model loads.
    try:
        tokenizer = load_tokenizer(cfg.model, source)
    except (OSError, ValueError) as e:
        raise ConfigError([f"the tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path} cannot be used: {e}"]) from e
    with accelerator.main_process_first():
        data = build_datasets(cfg.data, tokenizer, seed=t.seed)
    width_multiple = batch_width_multiple(cfg.speed.compile, cfg.data.packing or cfg.speed.cuda_graphs,
                                          cfg.data.max_length)
    collate = Collator(tokenizer.pad_token_id, pad_to_multiple_of=width_multiple, max_width=cfg.data.max_length)
    train_batches = EpochBatches(
        data.train, t.batch_size, collate, seed=t.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    # What the trained state depends on (base, quant, LoRA, tokenizer, data), recorded in every
    # checkpoint and adapter; a checkpoint of anything else is refused here, before the model loads.
    fingerprint = run_fingerprint(cfg, source, tokenizer, data.train, data.eval)
    changed = check_resumable(resume_from, fingerprint, cfg, accelerator.num_processes) if resume_from else []

    # 2. The frozen quantized base, prepared for k-bit training, with LoRA adapters on top.
    model = load_base(cfg, source, device)
    footprint = model.get_memory_footprint()
    model = prepare_for_training(model, cfg)
    if cfg.speed.compile:
        compile_blocks(model, cfg.speed.cuda_graphs, cfg.data.max_length)  # compiles at each new batch width
    trainable, total = count_parameters(model)

    # 3. Optimizer over the adapter parameters only; the LR schedule counts optimizer steps.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    # Resuming: adapter weights, optimizer, scheduler, scaler, data position and counters as saved.
    checkpoint_parts = dict(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                            sampler=train_batches)
    state = load_checkpoint(resume_from, **checkpoint_parts) if resume_from else TrainState()

    if cfg.log.wandb:
        accelerator.init_trackers(
            cfg.log.wandb_project,
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            init_kwargs={"wandb": {"mode": cfg.log.wandb_mode, "dir": str(run_dir), "entity": cfg.log.wandb_entity}},
        )
    if is_main:
        report.print_start(
            cfg, source=source, footprint=footprint, trainable=trainable, total=total,
            data=data, world_size=accelerator.num_processes, device=device,
            mixed_precision=accelerator.mixed_precision, run_dir=run_dir,
        )
        if resume_from:
            print(f"resuming     from {resume_from} (step {state.step} of {t.max_steps})"
                  + "".join(f"\n             changed since: {line}" for line in changed), flush=True)

    def eval_batches():
        if data.eval is None:
            return []
        batches = EpochBatches(
            data.eval, t.batch_size, collate, seed=t.seed, shuffle=False, drop_last=False,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
        ).one_epoch()
        return batches if t.eval_batches is None else batches[: t.eval_batches]

    if not resume_from:  # a resumed run has these from its checkpoint
        if data.eval is not None:
            state.evals.append([0, evaluate(model, eval_batches(), accelerator, cfg.speed)])
        if is_main:
            # Under autocast as in training: the adapters expect the autocast dtype (model.prepare_for_training).
            with accelerator.autocast():
                state.samples_before = generate_samples(accelerator.unwrap_model(model), tokenizer, cfg, data.format)

    def save(step: int) -> Path:
        manifest = adapter_manifest(cfg, source=source, step=step, fingerprint=fingerprint)
        return save_checkpoint(run_dir, state, manifest=manifest, keep_last=t.keep_last, **checkpoint_parts)

    # 4. The loop. A step is one optimizer update over grad_accum micro-batches.
    model.train()
    batches = iter(train_batches)
    first_step = state.step + 1
    if resume_from:
        # Last thing before the first resumed step, so the LoRA dropout masks (torch RNG) and every
        # other random draw continue exactly where the interrupted run left them.
        restore_rng(resume_from, accelerator.process_index)
    progress = tqdm(range(first_step, t.max_steps + 1), initial=first_step - 1, total=t.max_steps,
                    desc="training", disable=not is_main, dynamic_ncols=True)
    after_first_step = None  # (tokens, seconds) when this launch's first step was done
    for step in progress:
        step_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(t.grad_accum)]
        # Every process must divide by the same global count of target tokens.
        local_targets = sum(count_targets(b) for b in micro_batches)
        global_targets = int(accelerator.reduce(torch.tensor(local_targets, device=device), reduction="sum"))
        step_loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == len(micro_batches) - 1
            # Gradients are synchronized across processes only on the last micro-batch.
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss_sum = causal_lm_loss_sum(model, batch, cfg.speed.loss_chunk_size, cfg.speed.compile)
                # DDP averages gradients over processes; scaling by the process count makes the
                # step's gradient the mean over all target tokens of the global batch.
                accelerator.backward(loss_sum * accelerator.num_processes / max(global_targets, 1))
            step_loss_sum += loss_sum.detach().double()
            state.tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes

        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        loss = float(accelerator.reduce(step_loss_sum, reduction="sum")) / max(global_targets, 1)
        finite = math.isfinite(loss) and math.isfinite(float(grad_norm))
        scaler_overflow = accelerator.scaler is not None and math.isfinite(loss) and not finite
        if finite or accelerator.scaler is not None:
            # With an fp16 grad scaler this runs on non-finite steps too: the scaler then skips the
            # update itself and lowers its scale (it must see every step, or it never recovers).
            optimizer.step()
        if finite:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # a non-finite step's gradients are dropped here
        state.step = step
        state.train_seconds += time.perf_counter() - step_start
        if step == first_step:
            # A launch's first step compiles the blocks (speed.compile) and warms the allocator and
            # kernels' caches; the rate after it is the one the run sustains.
            after_first_step = (state.tokens_seen, state.train_seconds)

        if finite:
            state.bad_steps_in_row = 0
            state.losses.append([step, loss])
        else:
            # A non-finite step would poison the adapter: it is skipped and counted. An fp16 scaler's
            # overflow (finite loss, inf gradients) is its normal way to find a scale; it is counted
            # but does not end the run, since each one halves the scale.
            state.skipped_steps += 1
            state.bad_steps_in_row += 0 if scaler_overflow else 1
            progress.write(f"step {step}: non-finite loss {loss} / grad norm {float(grad_norm)}; step skipped")
            if state.bad_steps_in_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.bad_steps_in_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                    "lower train.lr, check the data, or use quant.compute_dtype=bfloat16. "
                    "No adapter was saved from these steps."
                )
        if finite and (step % t.log_every == 0 or step == t.max_steps):
            lr = scheduler.get_last_lr()[0]
            tok_s = sustained_tokens_per_s(state, after_first_step) or state.tokens_seen / state.train_seconds
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                             "train/tokens_per_s": tok_s}, step=step)
        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps and data.eval is not None:
            eval_loss = evaluate(model, eval_batches(), accelerator, cfg.speed)
            state.evals.append([step, eval_loss])
            accelerator.log({"eval/loss": eval_loss}, step=step)
            progress.write(f"step {step}: eval loss {eval_loss:.4f}")
        # The last step is always checkpointed: a run killed while it writes its adapter, or one
        # given more steps later, goes on from its final state.
        saved = save(step) if step == t.max_steps or (t.save_every and step % t.save_every == 0) else None

        # A stop request ends the run here with a checkpoint, resumable with train.resume=auto:
        # SIGTERM/SIGINT (preemption, Ctrl-C), or train.stop_after_steps (a time-boxed job). The
        # processes agree on it first: one stopping alone would leave the others waiting forever.
        signum = int(accelerator.gather(torch.tensor([stop.received or 0], device=device)).max())
        time_boxed = t.stop_after_steps is not None and step - first_step + 1 >= t.stop_after_steps
        if (signum or time_boxed) and step < t.max_steps:
            saved = saved or save(step)
            progress.close()
            why = f"by {signal.Signals(signum).name}" if signum else f"after train.stop_after_steps={t.stop_after_steps}"
            if is_main:
                print(f"\nfinetune: stopped {why} at step {step} of {t.max_steps}; checkpoint {saved}\n"
                      "  go on with the same command plus train.resume=auto", flush=True)
            accelerator.end_training()
            if signum:
                raise SystemExit(128 + signum)  # as a shell reports a process ended by that signal
            return RunResult({"stopped_at_step": step, "checkpoint": str(saved)},
                             accelerator.unwrap_model(model), tokenizer)
    progress.close()

    # 5. Final eval, adapter, samples and the end-of-run summary.
    if data.eval is not None:
        state.evals.append([t.max_steps, evaluate(model, eval_batches(), accelerator, cfg.speed)])
        accelerator.log({"eval/loss": state.evals[-1][1]}, step=t.max_steps)
    accelerator.wait_for_everyone()
    summary: dict = {}
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        # Checked on the way out: every LoRA tensor there, all finite, none still all zero.
        adapter_dir = save_adapter(unwrapped, run_dir / "adapter",
                                   adapter_manifest(cfg, source=source, step=t.max_steps, fingerprint=fingerprint))
        peak, peak_kind = peak_memory_gib(device)
        with accelerator.autocast():
            samples_after = generate_samples(unwrapped, tokenizer, cfg, data.format)
        summary = {
            "steps": t.max_steps,
            "skipped_nonfinite_steps": state.skipped_steps,
            "first_loss": state.losses[0][1] if state.losses else None,
            "final_loss": state.losses[-1][1] if state.losses else None,
            "losses": state.losses,
            "eval_loss": state.evals,
            "resumed_from": str(resume_from) if resume_from else None,
            "tokens": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
            "tokens_per_s_after_first_step": sustained_tokens_per_s(state, after_first_step),
            "peak_memory_gib": peak,
            "peak_memory_kind": peak_kind,
            "memory_footprint_bytes": footprint,
            "trainable_params": trainable,
            "total_params": total,
            "adapter_dir": str(adapter_dir),
            "wall_seconds": time.perf_counter() - started,
            "samples_before": state.samples_before,
            "samples_after": samples_after,
        }
        with disk_errors("summary.json", run_dir):
            write_json_atomic(run_dir / "summary.json", summary)
        report.print_end(summary)
    accelerator.end_training()
    return RunResult(summary, accelerator.unwrap_model(model), tokenizer)
