"""The training loop, read top to bottom: setup, the step (`queue_step`, `finish_step`, `Steps`), the
loop, finish.

Built on `accelerate.Accelerator` for device placement, mixed precision and multi-GPU, with the
gradient accumulation written out by hand so that the loss of a step is the mean over every target
token of the step (all micro-batches, all processes), not a mean of per-batch means. The loop runs
its steps through `Steps`, which queues each step behind the one before and reads that one's numbers
only then; scripts/bench.py times steps through the same class.
"""

from __future__ import annotations

import contextlib
import itertools
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
from finetune.adapter import adapter_manifest, load_adapter_weights, save_adapter
from finetune.atomic import disk_errors, write_json_atomic
from finetune.checkpoint import TrainState, check_resumable, load_checkpoint, restore_rng, save_checkpoint
from finetune.config import Config, ConfigError, SpeedConfig, TrainConfig
from finetune.curves import write_run_curves
from finetune.data import Collator, PreparedData, build_datasets
from finetune.distributed import full_adapter_state, is_fsdp, make_accelerator, set_wrap_class, strategy
from finetune.fingerprint import run_fingerprint
from finetune.generate import generate_samples
from finetune.loss import IGNORE_INDEX, batch_on_device
from finetune.model import build_model, count_parameters
from finetune.objectives import SupervisedObjective, add_reference_copy, objective_for
from finetune.preference import PairCollator, build_preference_datasets
from finetune.sampler import EpochBatches
from finetune.signals import StopSignals
from finetune.source import load_tokenizer
from finetune.speed import batch_widths
from finetune.speed.compile import decoder_blocks


@dataclass
class RunResult:
    summary: dict  # what the end-of-run screen shows (main process only; empty elsewhere)
    model: object  # the trained PeftModel, unwrapped from accelerate
    tokenizer: object


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why."""


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: float  # the step's mean loss: per target token (sft), per pair (dpo, orpo), over every process
    grad_norm: float
    finite: bool  # False: the loss or gradient was NaN/inf and the update was skipped
    scaler_overflow: bool  # an fp16 grad scaler's overflow (finite loss, inf gradients): its normal search
    tokens: int  # tokens in the step's batches (attention mask), over every process
    metrics: dict  # the objective's step means (DPO/ORPO rewards, margins, accuracies); empty for sft
    seconds: float  # from the step's start (or the end of the step it was queued behind) to its end


def build_optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adamw":
        params = list(params)
        # PyTorch's fused AdamW: one kernel launch for all adapter tensors (an 8B model with
        # all-linear LoRA has ~450). It wants them on one CUDA or CPU device; adapters split between
        # the GPU and CPU offload take the multi-tensor path.
        fused = len({p.device for p in params}) == 1 and params[0].device.type in ("cuda", "cpu")
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def _skips_non_finite_on_device(optimizer, device: torch.device) -> bool:
    """Whether the optimizer skips its update itself, on `device`, given a found_inf flag there: PyTorch's
    fused AdamW (build_optimizer's choice when the adapters share one device) does."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) is not torch.optim.AdamW or not inner.defaults.get("fused"):
        return False
    params = [p for group in inner.param_groups for p in group["params"]]
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):  # FSDP2's shards would need the flag as one too
            return False
    # on another device the flag would arrive by a copy the update does not wait for
    return all(p.device == device for p in params)


def build_scheduler(optimizer, t: TrainConfig):
    """The LR schedule, counted in optimizer steps."""
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps_for_run(), num_training_steps=t.max_steps)


@dataclass
class QueuedStep:
    """An optimizer step whose work is queued on the device and whose numbers are not read yet."""

    numbers: torch.Tensor  # grad norm, loss sum, then the metric sums (float64), in host memory once `end` is
    metric_names: list[str]
    tokens: int
    update_queued: bool  # the update is queued too, skipped on the device if the step is not finite
    begin: object  # when the step's time starts (_moment): its own start, or the end of the step it was queued behind
    end: object  # when its work (and the copy of `numbers`) is done


def _moment(device: torch.device):
    """Now, on `device`'s clock: an event recorded on the GPU, perf_counter() on the CPU (where the work
    runs as it is queued). Steps are timed on the GPU from event to event: the host reads a step only
    once the next is queued, so times taken at the reads would move time between steps."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(begin, end) -> float:
    return begin.elapsed_time(end) / 1e3 if isinstance(end, torch.cuda.Event) else end - begin


def queue_step(model, optimizer, micro_batches: list[dict], *, accelerator: Accelerator, params: list,
               speed: SpeedConfig, max_grad_norm: float, objective=None, before_update=None) -> QueuedStep:
    """Queue one optimizer step over `micro_batches` (train.grad_accum of them) without waiting for the
    device: forward and backward, clipping and, where the optimizer can skip a non-finite step on the
    device, the update. `before_update()` runs once the gradients are queued and before the update (Steps
    reads the previous step's numbers there and takes its LR schedule step).

    `objective` (finetune.objectives) is what the step minimizes; next-token cross-entropy by default.
    """
    objective = objective or SupervisedObjective()
    device = accelerator.device
    begin = _moment(device)
    if speed.cuda_graphs:
        # A new step starts: the compiled blocks' CUDA graphs may replay. Without this, cudagraph trees
        # guess step boundaries and, with micro-batches and checkpointed blocks, stay in warm-up for
        # many steps ("pending, uninvoked backwards").
        torch.compiler.cudagraph_mark_step_begin()
    # Every process divides by the same global counts (target tokens; pairs), counted on the CPU: on
    # the GPU it would sync the step. The micro-batches' shares then add up to the step's mean.
    local_units = [sum(u) for u in zip(*(objective.units(b) for b in micro_batches))]
    global_units = local_units if accelerator.num_processes == 1 else \
        [int(u) for u in accelerator.reduce(torch.tensor(local_units, device=device), reduction="sum")]
    loss_all = torch.zeros((), device=device, dtype=torch.float64)
    metrics_all: dict[str, torch.Tensor] = {}
    tokens = 0
    for i, batch in enumerate(micro_batches):
        tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes  # on the CPU: no sync
        batch = batch_on_device(batch, device)
        # Gradients are synchronized across processes only on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                share, metrics = objective.loss(model, batch, global_units, speed)
            # DDP averages gradients over processes; scaling by the process count makes the step's
            # gradient that of the mean over the whole global batch.
            accelerator.backward(share * accelerator.num_processes)
        loss_all += share.detach().double()
        for name, value in metrics.items():
            metrics_all[name] = metrics_all.get(name, 0) + value.double()

    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    grad_norm = torch.as_tensor(grad_norm).to(loss_all).reshape(())
    sums = [accelerator.reduce(value, reduction="sum") for value in (loss_all, *metrics_all.values())]
    if before_update is not None:
        before_update()
    update_queued = accelerator.scaler is None and _skips_non_finite_on_device(optimizer, grad_norm.device)
    if update_queued:
        # Queued before the host reads the step's numbers, so the GPU runs the update while the host
        # waits for them (launched after, the GPU idles until the launch): fused AdamW leaves the
        # parameters and its state's numbers as they were when found_inf is set, as for a grad scaler.
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = (~(torch.isfinite(grad_norm) & torch.isfinite(sums[0]))).float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        optimizer.zero_grad(set_to_none=True)  # a non-finite step's gradients are dropped here
    # One copy to the host for all of them, which the host waits for only when it reads them.
    numbers = torch.stack([grad_norm, *sums]).to("cpu", non_blocking=True)  # into pinned memory: no wait
    return QueuedStep(numbers, list(metrics_all), tokens, update_queued, begin, _moment(device))


def finish_step(queued: QueuedStep, optimizer, scheduler, scaler=None) -> StepOutcome:
    """Read a queued step's numbers (waiting for them) and end the step: the update where queue_step
    could not queue it, and the LR schedule's step if the step was finite. A non-finite step changes no
    parameter or optimizer number."""
    if isinstance(queued.end, torch.cuda.Event):
        queued.end.synchronize()
    grad_norm, loss, *metric_values = queued.numbers.tolist()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if not queued.update_queued:
        if finite or scaler is not None:
            # With an fp16 grad scaler this runs on non-finite steps too: the scaler then skips the update
            # itself and lowers its scale (it must see every step, or it never recovers).
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # a non-finite step's gradients are dropped here
    if finite:
        scheduler.step()
    return StepOutcome(loss, grad_norm, finite, scaler is not None and math.isfinite(loss) and not finite,
                       queued.tokens, dict(zip(queued.metric_names, metric_values)),
                       _seconds(queued.begin, queued.end))


class Steps:
    """Optimizer steps queued back to back: a step's numbers are read once the next step's forward and
    backward are queued, so the device goes from one step to the next without waiting for the host
    (its bookkeeping, the next batch, the forward's first launches). The training loop and
    scripts/bench.py both run their steps through this.

    The previous step is read first instead (`queue` returns it before queueing) where its update
    could not be queued on the device (an fp16 grad scaler, optimizers that skip on the host, FSDP2's
    sharded parameters) or with several processes. `finish()` reads the pending step now: the loop
    calls it before a step that saves, evaluates or stops, so nothing of the next step has run then.
    """

    def __init__(self, model, optimizer, scheduler, *, accelerator: Accelerator, params: list, speed: SpeedConfig,
                 max_grad_norm: float, objective=None):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.step_arguments = dict(accelerator=accelerator, params=params, speed=speed, max_grad_norm=max_grad_norm,
                                   objective=objective)
        self.pending: Optional[QueuedStep] = None

    def can_overlap(self) -> bool:
        """Whether the next step can be queued behind the pending one (see the class)."""
        return self.pending is not None and self.pending.update_queued and self.accelerator.num_processes == 1

    def queue(self, micro_batches: list[dict]) -> Optional[StepOutcome]:
        """Queue a step; returns the step that was pending before it, read while this one was queued
        (or before, see the class), or None."""
        earlier: list[StepOutcome] = []
        overlap = self.can_overlap()
        if self.pending is not None and not overlap:
            earlier.append(self.finish())
        behind = self.pending.end if overlap else None
        queued = queue_step(self.model, self.optimizer, micro_batches, **self.step_arguments,
                            before_update=(lambda: earlier.append(self.finish())) if overlap else None)
        if behind is not None:  # its time runs from the end of the step it was queued behind
            queued.begin = behind
        self.pending = queued
        return earlier[0] if earlier else None

    def finish(self) -> Optional[StepOutcome]:
        """Read the pending step (waiting for the device) and end it; None if no step is pending."""
        if self.pending is None:
            return None
        queued, self.pending = self.pending, None
        return finish_step(queued, self.optimizer, self.scheduler, self.accelerator.scaler)


def train_step(model, optimizer, scheduler, micro_batches: list[dict], *, accelerator: Accelerator, params: list,
               speed: SpeedConfig, max_grad_norm: float, objective=None) -> StepOutcome:
    """One optimizer step over `micro_batches`, queued and read at once (Steps overlaps them)."""
    queued = queue_step(model, optimizer, micro_batches, accelerator=accelerator, params=params, speed=speed,
                        max_grad_norm=max_grad_norm, objective=objective)
    return finish_step(queued, optimizer, scheduler, accelerator.scaler)


def record_cuda_graphs(model, batch: dict, *, accelerator: Accelerator, speed: SpeedConfig, objective) -> float:
    """speed.cuda_graphs: record the compiled blocks' graphs before the first step; returns the seconds.

    Two forward and backward passes on `batch`: the first runs the graphs uncaptured, the second
    records them. Their gradients are dropped and the random generators put back, so the steps after
    compute what they would have without this. Recorded inside the first steps instead, the recording
    overlapped the optimizer state the first update creates, and that step was the run's peak
    (llama3-8b b2, 31 blocks without checkpointing: 16.77 GiB, against 16.49 once recorded here;
    docs/decisions.md). A resumed run has its optimizer state already: recording here still keeps the
    recording out of the timed steps.
    """
    objective = objective or SupervisedObjective()
    units = objective.units(batch)
    batch = batch_on_device(batch, accelerator.device)
    start = time.perf_counter()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for _ in range(2):
            torch.compiler.cudagraph_mark_step_begin()
            with accelerator.autocast():
                share, _ = objective.loss(model, batch, units, speed)
            accelerator.backward(share)
            model.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, batches, accelerator: Accelerator, speed: SpeedConfig, objective=None) -> float:
    """The objective's mean loss over the eval batches (per target token, or per pair), across every process."""
    objective = objective or SupervisedObjective()
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in batches:
        if speed.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        units = objective.units(batch)  # this batch's own counts: its loss is the batch's mean
        batch = batch_on_device(batch, accelerator.device)
        with accelerator.autocast():
            mean, _ = objective.loss(model, batch, units, speed)
        totals[0] += mean.double() * units[0]
        totals[1] += units[0]
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def eval_batches(data: PreparedData, t: TrainConfig, collate, accelerator: Accelerator) -> list[dict]:
    """This process's share of the eval split (train.eval_batches of them at most), in order."""
    if data.eval is None:
        return []
    sharded = EpochBatches(data.eval, t.batch_size, collate, seed=t.seed, shuffle=False, drop_last=False,
                           rank=accelerator.process_index, world_size=accelerator.num_processes)
    batches = sharded.one_epoch()
    # Every process runs the same number of forwards (under FSDP each one is a collective): a process
    # short of the others' count repeats a batch with every label ignored, which adds nothing.
    if len(batches) < sharded.batches_per_epoch():
        first = batches[0] if batches else next(iter(EpochBatches(data.eval, t.batch_size, collate, seed=t.seed,
                                                                  shuffle=False, drop_last=False)))
        padding = {**first, "labels": torch.full_like(first["labels"], IGNORE_INDEX)}
        batches += [padding] * (sharded.batches_per_epoch() - len(batches))
    return batches if t.eval_batches is None else batches[: t.eval_batches]


def eval_log(eval_loss: float, t: TrainConfig) -> dict[str, float]:
    """The eval figures logged: loss, and for next-token cross-entropy its perplexity."""
    if t.objective != "sft":
        return {"eval/loss": eval_loss}
    return {"eval/loss": eval_loss, "eval/perplexity": report.perplexity(eval_loss)}


def eval_line(eval_loss: float, t: TrainConfig) -> str:
    line = f"eval loss {eval_loss:.4f}"
    return line + (f", perplexity {report.perplexity(eval_loss):.2f}" if t.objective == "sft" else "")


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
    accelerator = make_accelerator(cfg, run_dir, cfg.mixed_precision())
    fsdp = is_fsdp(accelerator)
    set_seed(t.seed)  # python, numpy, torch and CUDA generators, on every process
    device, is_main = accelerator.device, accelerator.is_main_process
    started = time.perf_counter()

    # 1. Tokenizer and data first: bad data fails in seconds, before the model loads.
    try:
        tokenizer = load_tokenizer(cfg.model, source)
    except (OSError, ValueError) as e:
        raise ConfigError([f"the tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path} cannot be used: {e}"]) from e
    objective = objective_for(t)
    widths = batch_widths(cfg.speed, cfg.data.packing, cfg.data.max_length)
    with accelerator.main_process_first():
        if t.objective == "sft":
            data, collate = build_datasets(cfg.data, tokenizer, seed=t.seed), Collator(tokenizer.pad_token_id, widths)
        else:  # chosen/rejected pairs, collated into one [chosen; rejected] batch
            data = build_preference_datasets(cfg.data, tokenizer, seed=t.seed)
            collate = PairCollator(tokenizer.pad_token_id, widths)
    train_batches = EpochBatches(data.train, t.batch_size, collate, seed=t.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    # What the trained state depends on (base, quant, LoRA, tokenizer, data), recorded in every
    # checkpoint and adapter; a checkpoint of anything else is refused here, before the model loads.
    fingerprint = run_fingerprint(cfg, source, tokenizer, data.train, data.eval)
    changed = check_resumable(resume_from, fingerprint, cfg, accelerator.num_processes, fsdp) if resume_from else []
    if is_main:  # the launch is accepted: its resolved config becomes the run's record
        with disk_errors("config.json", run_dir):
            write_json_atomic(run_dir / "config.json", OmegaConf.to_container(OmegaConf.structured(cfg)))

    # 2. The frozen quantized base with LoRA adapters (and the speed settings) on top, the adapters
    # starting from a saved one if asked (lora.init_from: e.g. SFT before DPO, which is then also the
    # DPO reference, kept as a frozen second adapter on the same base).
    # Under FSDP on GPUs the base is quantized into CPU memory and each rank's GPU receives only its
    # shards, one block at a time, as accelerate.prepare shards it: a base larger than one GPU loads.
    model, footprint = build_model(cfg, source, device, stage_on_cpu=fsdp and device.type == "cuda")
    if cfg.lora.init_from:
        init = load_adapter_weights(model, cfg.lora.init_from)
        if init.data.get("fingerprint", {}).get("base") not in (None, fingerprint["base"]):
            raise ConfigError([f"lora.init_from={cfg.lora.init_from} was trained on another base model "
                               f"({init.data['base_model']}): an adapter only works on the base it was trained on"])
        if t.objective == "dpo" and not t.dpo_reference_free:
            add_reference_copy(model)
    trainable, total = count_parameters(model)
    set_wrap_class(accelerator, type(decoder_blocks(model)[0]).__name__)

    # 3. Optimizer over the adapter parameters only. The scheduler stays unprepared: accelerate's
    # wrapper would step it once per process.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t)
    scheduler = build_scheduler(optimizer, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Collected again: FSDP2 replaces every parameter with its sharded version as it shards the model (the
    # optimizer is switched over by accelerate). The old objects get no gradients, so clipping and the
    # non-finite check would see a gradient norm of 0.
    params = [p for p in model.parameters() if p.requires_grad]
    # Resuming: adapter weights, optimizer, scheduler, scaler, data position and counters as saved.
    parts = dict(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, sampler=train_batches)
    state = load_checkpoint(resume_from, **parts) if resume_from else TrainState()

    if cfg.log.wandb:
        accelerator.init_trackers(
            cfg.log.wandb_project, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            init_kwargs={"wandb": {"mode": cfg.log.wandb_mode, "dir": str(run_dir), "entity": cfg.log.wandb_entity}},
        )
    if is_main:
        report.print_start(cfg, source=source, footprint=footprint, trainable=trainable, total=total, data=data,
                           world_size=accelerator.num_processes, device=device,
                           mixed_precision=accelerator.mixed_precision, run_dir=run_dir, strategy=strategy(accelerator))
        if cfg.dist.strategy == "fsdp" and not fsdp:
            print("[finetune] dist.strategy=fsdp: this launch is one process with no process group, so nothing is "
                  "sharded; it trains as a single process (launch with torchrun or accelerate launch to shard)",
                  flush=True)
        if fsdp and cfg.sample.prompts:
            print("[finetune] sample.prompts are not generated under FSDP (generation would need every rank in "
                  "step); load the adapter with `python -m finetune.generate` instead", flush=True)
        if resume_from:
            print(f"resuming     from {resume_from} (step {state.step} of {t.max_steps})"
                  + "".join(f"\n             changed since: {line}" for line in changed), flush=True)
    if not resume_from:  # a resumed run has these from its checkpoint
        if data.eval is not None:
            state.evals.append([0, evaluate(model, eval_batches(data, t, collate, accelerator), accelerator, cfg.speed,
                                            objective)])
        if is_main and not fsdp:
            # Under autocast as in training: the adapters expect the autocast dtype (model.prepare_for_training).
            with accelerator.autocast():
                state.samples_before = generate_samples(accelerator.unwrap_model(model), tokenizer, cfg.data,
                                                        cfg.sample, data.format)

    def save(step: int) -> Path:
        manifest = adapter_manifest(cfg, source=source, step=step, fingerprint=fingerprint)
        saved = save_checkpoint(run_dir, state, manifest=manifest, keep_last=t.keep_last, **parts)
        if is_main:  # the picture of the run so far, beside it
            with disk_errors("curves.png", run_dir):
                write_run_curves(run_dir / "curves.png", state.losses, state.evals, state.history)
        return saved

    # 4. The loop. A step is one optimizer update over grad_accum micro-batches.
    model.train()
    batches = iter(train_batches)
    first_step = state.step + 1
    graphs_seconds = 0.0
    if cfg.speed.cuda_graphs and first_step <= t.max_steps:
        first_batch = next(batches)
        batches = itertools.chain([first_batch], batches)
        graphs_seconds = record_cuda_graphs(model, first_batch, accelerator=accelerator, speed=cfg.speed,
                                            objective=objective)
    if resume_from:
        # Last thing before the first resumed step, so the LoRA dropout masks (torch RNG) and every
        # other random draw continue exactly where the interrupted run left them.
        restore_rng(resume_from, accelerator.process_index)
    progress = tqdm(range(first_step, t.max_steps + 1), initial=first_step - 1, total=t.max_steps,
                    desc="training", disable=not is_main, dynamic_ncols=True)
    launch = report.Throughput()  # this launch's step times, for the steady-state rate
    steps = Steps(model, optimizer, scheduler, accelerator=accelerator, params=params, speed=cfg.speed,
                  max_grad_norm=t.max_grad_norm, objective=objective)

    def ends_alone(step: int) -> bool:
        """Whether `step` evaluates, saves or may stop the run: then it is read and accounted before the
        next step is queued, so the checkpoint, the eval and the random generators are the step's own."""
        return bool(stop.received or (t.eval_every and step % t.eval_every == 0 and data.eval is not None)
                    or (t.save_every and step % t.save_every == 0)
                    or (t.stop_after_steps is not None and step - first_step + 1 >= t.stop_after_steps))

    def account(step: int, outcome: StepOutcome, next_step_queued: bool) -> Optional[RunResult]:
        """Count, log, evaluate, save and maybe stop after `step`; returns the result of a run that stops
        here. With the next step already queued it only counts and logs (ends_alone said so)."""
        state.step, state.tokens_seen = step, state.tokens_seen + outcome.tokens
        state.train_seconds += outcome.seconds
        launch.add(outcome.tokens, outcome.seconds)

        # A non-finite step would poison the adapter: it was skipped, and is counted here. An fp16
        # scaler's overflow is its normal way to find a scale (each one halves it): counted, but it
        # never ends the run.
        if outcome.finite:
            state.bad_steps_in_row = 0
            state.losses.append([step, outcome.loss])
        else:
            state.skipped_steps += 1
            state.bad_steps_in_row += 0 if outcome.scaler_overflow else 1
            progress.write(f"step {step}: non-finite loss {outcome.loss} / grad norm {outcome.grad_norm}; step skipped")
            if state.bad_steps_in_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.bad_steps_in_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                    "lower train.lr, check the data, or use quant.compute_dtype=bfloat16. "
                    "No adapter was saved from these steps."
                )
        if outcome.finite:
            lr = scheduler.get_last_lr()[0]
            tok_s = launch.steady_tokens_per_s() or launch.tokens_per_s()
            state.history.append([step, {"lr": lr, "tokens_per_s": tok_s, **outcome.metrics}])  # for curves.png
            if step % t.log_every == 0 or step == t.max_steps:
                peak = peak_memory_gib(device)[0]  # so far: which step reached the run's peak shows in the log
                progress.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                     peak=f"{peak:.2f}GiB")
                accelerator.log({"train/loss": outcome.loss, "train/lr": lr, "train/grad_norm": outcome.grad_norm,
                                 "train/tokens_per_s": tok_s, "train/peak_memory_gib": peak,
                                 **{f"train/{k}": v for k, v in outcome.metrics.items()}}, step=step)
        if next_step_queued:
            return None
        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps and data.eval is not None:
            eval_loss = evaluate(model, eval_batches(data, t, collate, accelerator), accelerator, cfg.speed, objective)
            state.evals.append([step, eval_loss])
            accelerator.log(eval_log(eval_loss, t), step=step)
            progress.write(f"step {step}: " + eval_line(eval_loss, t))
        # The last step is always checkpointed: a run killed while it writes its adapter, or one
        # given more steps later, goes on from its final state.
        saved = save(step) if step == t.max_steps or (t.save_every and step % t.save_every == 0) else None

        # A stop request ends the run here with a checkpoint, resumable with train.resume=auto:
        # SIGTERM/SIGINT (preemption, Ctrl-C), or train.stop_after_steps (a time-boxed job). The
        # processes agree on it first: one stopping alone would leave the others waiting forever.
        signum = stop.received or 0
        if accelerator.num_processes > 1:
            signum = int(accelerator.gather(torch.tensor([signum], device=device)).max())
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
            return RunResult({"stopped_at_step": step, "checkpoint": str(saved)}, accelerator.unwrap_model(model),
                             tokenizer)
        return None

    for step in progress:
        # The step before is still pending when it was queued behind: read it now if it must end alone.
        if steps.pending is not None and (not steps.can_overlap() or ends_alone(step - 1)):
            stopped = account(step - 1, steps.finish(), next_step_queued=False)
            if stopped is not None:
                return stopped
        micro_batches = [next(batches) for _ in range(t.grad_accum)]
        earlier = steps.queue(micro_batches)  # the step before, read once this one's gradients were queued
        if earlier is not None:
            account(step - 1, earlier, next_step_queued=True)
    if steps.pending is not None:
        account(t.max_steps, steps.finish(), next_step_queued=False)
    progress.close()

    # 5. Final eval, adapter, samples and the end-of-run summary.
    if data.eval is not None:
        state.evals.append([t.max_steps, evaluate(model, eval_batches(data, t, collate, accelerator), accelerator,
                                                  cfg.speed, objective)])
        accelerator.log(eval_log(state.evals[-1][1], t), step=t.max_steps)
    accelerator.wait_for_everyone()
    adapter_state = full_adapter_state(accelerator, model)  # under FSDP a collective: every rank gathers
    summary: dict = {}
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        # Checked on the way out: every LoRA tensor there, all finite, none still all zero.
        adapter_dir = save_adapter(unwrapped, run_dir / "adapter",
                                   adapter_manifest(cfg, source=source, step=t.max_steps, fingerprint=fingerprint),
                                   state_dict=adapter_state)
        peak, peak_kind = peak_memory_gib(device)
        samples_after = []
        if not fsdp:
            with accelerator.autocast():
                samples_after = generate_samples(unwrapped, tokenizer, cfg.data, cfg.sample, data.format)
        summary = {
            "steps": t.max_steps,
            "objective": t.objective,
            "skipped_nonfinite_steps": state.skipped_steps,
            "first_loss": state.losses[0][1] if state.losses else None,
            "final_loss": state.losses[-1][1] if state.losses else None,
            "losses": state.losses,
            "history": state.history,
            "eval_loss": state.evals,
            "resumed_from": str(resume_from) if resume_from else None,
            "tokens": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
            **launch.summary(),
            "cuda_graphs_record_seconds": graphs_seconds,
            "peak_memory_gib": peak,
            "peak_memory_kind": peak_kind,
            "memory_footprint_bytes": footprint,
            "trainable_params": trainable,
            "total_params": total,
            "adapter_dir": str(adapter_dir),
            "curves": str(run_dir / "curves.png"),
            "wall_seconds": time.perf_counter() - started,
            "samples_before": state.samples_before,
            "samples_after": samples_after,
        }
        with disk_errors("summary.json and curves.png", run_dir):
            write_json_atomic(run_dir / "summary.json", summary)
            write_run_curves(run_dir / "curves.png", state.losses, state.evals, state.history)
        report.print_end(summary)
    accelerator.end_training()
    return RunResult(summary, accelerator.unwrap_model(model), tokenizer)
