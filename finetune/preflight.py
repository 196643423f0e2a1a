"""Everything checked before any weights load, reported together.

Each config section checks its own fields (`Config.problems()`); this module holds what spans
sections or needs more than the config: the devices (bf16, GPUs), the model's module names and
blocks (read from a weightless meta-device copy), the output folder (writable, not a file) and the
run already in it (finished, interrupted, resumable). `preflight` runs them all and raises one
ConfigError naming every problem, so a user fixes them in one go instead of one per launch.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from finetune.config import Config, ConfigError
from finetune.quant import placement_problems, quant_module_problems, saved_quantization_problems

# Bytes written by the output folder's write probe: enough to meet a full disk, small enough to be free.
PROBE_BYTES = 64 * 1024


def config_problems(cfg: Config, *, cuda_available: bool, bf16_supported: bool) -> list[str]:
    """Every problem that needs no model: each section's own, then the rules spanning sections and devices."""
    p = cfg.problems()
    q, t, s = cfg.quant, cfg.train, cfg.speed
    p += saved_quantization_problems(q, cfg.model)
    p += placement_problems(q, cuda_available=cuda_available)

    uses_bf16 = q.compute_dtype == "bfloat16" or t.mixed_precision == "bf16"
    if uses_bf16 and cuda_available and not bf16_supported:
        p.append("bf16 was asked for (quant.compute_dtype or train.mixed_precision) but this GPU has "
                 "no bf16 support: set quant.compute_dtype=float16 train.mixed_precision=fp16")
    if t.mixed_precision == "fp16" and not cuda_available:
        p.append("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    if q.mode != "none" and q.compute_dtype == "float16" and t.mixed_precision == "bf16":
        p.append("quant.compute_dtype=float16 with train.mixed_precision=bf16 mixes two half types; pick one")
    if t.optimizer.startswith("paged") and not cuda_available:
        p.append(f"train.optimizer={t.optimizer} pages optimizer state through CUDA memory; on the CPU use adamw "
                 "or adamw_8bit")

    p += objective_problems(cfg)

    if s.compile and s.fp32_frozen and q.mode != "none":
        # Compiled blocks with fp32-upcast frozen norms gave NaN losses (docs/decisions.md).
        p.append("speed.compile=true with speed.fp32_frozen=true gave NaN losses in our GPU benchmark; "
                 "set speed.fp32_frozen=false with speed.compile=true")
    if s.blocks_without_checkpointing > 0 and not t.gradient_checkpointing:
        p.append(f"speed.blocks_without_checkpointing={s.blocks_without_checkpointing} has no effect with "
                 "train.gradient_checkpointing=false (no block is checkpointed); set it to 0 or turn checkpointing on")
    if s.fused_lora:
        from finetune.speed.fused_lora import kernel_problems

        p += kernel_problems(cuda_available)
    if s.fp8_frozen_matmuls:
        p += fp8_problems(cfg, cuda_available)
    if s.cuda_graphs and t.grad_accum > 1:
        # A graph replay hands gradients out of the graph's own memory, which the next micro-batch's
        # replay overwrites: accumulation would give wrong gradients (pytorch/pytorch#169545).
        p.append(f"speed.cuda_graphs=true cannot accumulate gradients (train.grad_accum={t.grad_accum}): the next "
                 "micro-batch's graph replay overwrites them; set train.grad_accum=1 (and a larger "
                 "train.batch_size) or speed.cuda_graphs=false")
    if s.offload_embeddings and (cfg.quant.device_map or cfg.quant.max_memory):
        p.append("speed.offload_embeddings=true moves the input embeddings to CPU memory itself; quant.device_map and "
                 "quant.max_memory place modules through accelerate: use one or the other")
    if s.offload_checkpoints and not t.gradient_checkpointing:
        p.append("speed.offload_checkpoints=true offloads the inputs of checkpointed blocks, but "
                 "train.gradient_checkpointing=false checkpoints none; turn checkpointing on or remove it")
    if cfg.dist.cpu_offload and not cuda_available:
        p.append("dist.cpu_offload=true moves FSDP's shards between a GPU and the CPU; on the CPU there is nothing "
                 "to offload: remove dist.cpu_offload")
    return p + fsdp_problems(cfg)


def fp8_problems(cfg: Config, cuda_available: bool) -> list[str]:
    """What speed.fp8_frozen_matmuls cannot run on, each with its fix."""
    p = []
    if cfg.quant.mode not in ("nf4", "fp4"):
        p.append(f"speed.fp8_frozen_matmuls=true runs the frozen 4-bit layers' matmuls in FP8, but quant.mode="
                 f"{cfg.quant.mode}: use quant.mode=nf4 (or fp4), or set speed.fp8_frozen_matmuls=false")
    if cfg.quant.compute_dtype != "bfloat16":
        p.append(f"speed.fp8_frozen_matmuls=true is built and measured for bf16 compute (quant.compute_dtype="
                 f"{cfg.quant.compute_dtype}): use quant.compute_dtype=bfloat16")
    # torch's FP8 matmul takes token counts that are multiples of 16; a call with another count would
    # quietly run in bf16. Compiled runs pad every batch to fixed widths (multiples of 128, or
    # data.max_length), so a data.max_length that is a multiple of 16 makes every count one.
    if not cfg.speed.compile or cfg.data.max_length % 16:
        p.append(f"speed.fp8_frozen_matmuls=true runs batches whose token count is a multiple of 16: set "
                 f"speed.compile=true (it pads batches to fixed widths; speed=fast does) and data.max_length to a "
                 f"multiple of 16 (got speed.compile={str(cfg.speed.compile).lower()}, data.max_length="
                 f"{cfg.data.max_length})")
    if cfg.dist.strategy == "fsdp":
        p.append("speed.fp8_frozen_matmuls=true reads bitsandbytes' 4-bit layers, which dist.strategy=fsdp "
                 "stores as bf16 shards: use dist.strategy=ddp, or set speed.fp8_frozen_matmuls=false")
    if cuda_available:
        import torch

        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            p.append(f"speed.fp8_frozen_matmuls=true needs FP8 matmuls, which this GPU (compute capability "
                     f"{major}.{minor}) lacks: they start at 8.9 (Ada, Hopper); set speed.fp8_frozen_matmuls=false")
    return p


def fsdp_problems(cfg: Config) -> list[str]:
    """What FSDP (dist.strategy=fsdp) cannot shard or run, each with its fix."""
    if cfg.dist.strategy != "fsdp":
        return []
    q, s = cfg.quant, cfg.speed
    p = []
    if q.mode == "int8":
        p.append("dist.strategy=fsdp cannot shard LLM.int8 weights (quant.mode=int8: int8 tensors with their scales "
                 "outside the parameter); use quant.mode=nf4 quant.quant_storage=bfloat16, or dist=ddp")
    elif q.mode in ("nf4", "fp4") and q.quant_storage != "bfloat16":
        # FSDP2 shards floating-point parameters with the mixed-precision policy; accelerate leaves
        # integer-stored 4-bit weights out of sharding (every rank would hold the whole base).
        p.append(f"dist.strategy=fsdp needs the 4-bit weights stored as bfloat16 to shard them with the bf16 "
                 f"parameters (quant.quant_storage={q.quant_storage}): set quant.quant_storage=bfloat16")
    if q.device_map:
        p.append("dist.strategy=fsdp places every shard itself, one per rank; quant.device_map would place whole "
                 "modules: remove quant.device_map")
    if q.max_memory:
        p.append("dist.strategy=fsdp places every shard itself; remove quant.max_memory")
    if s.compile:
        p.append("speed.compile=true is not supported with dist.strategy=fsdp (compiled blocks are not "
                 "tested under FSDP2's hooks); set speed.compile=false")
    if s.offload_embeddings:
        p.append("speed.offload_embeddings=true is not supported with dist.strategy=fsdp (FSDP2 shards the "
                 "embedding matrix itself); set speed.offload_embeddings=false")
    if s.offload_checkpoints:
        p.append("speed.offload_checkpoints=true reruns blocks inside the backward pass, outside FSDP2's gather "
                 "hooks; with dist.strategy=fsdp use dist.cpu_offload=true for memory instead")
    return p


def objective_problems(cfg: Config) -> list[str]:
    """train.objective against the data settings: preference objectives read chosen/rejected pairs."""
    d, t = cfg.data, cfg.train
    if t.objective == "sft":
        if d.format == "preference":
            return ["data.format=preference holds chosen/rejected pairs: set train.objective=dpo or train.objective=orpo"]
        return []
    if t.objective not in ("dpo", "orpo"):
        return []  # TrainConfig.problems names it
    p = []
    if d.format not in ("preference", "auto"):
        p.append(f"train.objective={t.objective} trains on chosen/rejected pairs, but data.format={d.format}: "
                 "set data.format=preference and data.prompt_field / data.chosen_field / data.rejected_field")
    if d.packing:
        p.append(f"data.packing=true cannot pack chosen/rejected pairs (train.objective={t.objective}); set data.packing=false")
    if d.train_on_prompt:
        p.append(f"data.train_on_prompt=true has no meaning for train.objective={t.objective}: prompt tokens are never trained")
    return p


def model_problems(cfg: Config, source: str, *, cuda_available: bool) -> list[str]:
    """Problems that need the model's modules, read from a weightless (meta-device) copy: no weights load."""
    from finetune.quant import device_map_problems
    from finetune.source import meta_model
    from finetune.speed.alibi import FUSED_ALIBI_IMPLEMENTATIONS, fused_alibi_problems
    from finetune.speed.compile import decoder_blocks
    from finetune.speed.host_embeddings import offload_problems
    from finetune.speed.long_context import single_input_mlp

    model = meta_model(source, cfg.model)
    names = [name for name, _ in model.named_modules()]
    p = lora_module_problems(cfg, names) + quant_module_problems(cfg.quant, names)
    if cfg.quant.device_map and not any(s.startswith("quant.device_map names") for s in p):
        # accelerate would say only "does not give any device for lm_head.weight", after the model is built.
        p += device_map_problems(model, cfg.quant.device_map)
    if cfg.data.packing and "position_ids" not in inspect.signature(type(model).forward).parameters:
        p.append(f"data.packing=true needs a model that takes position ids; {cfg.model.name_or_path} "
                 "does not (e.g. bloom's ALiBi attention): set data.packing=false")
    config = model.config
    attention = cfg.model.attn_implementation or ("sdpa" if config.model_type == "bloom" else None)
    if attention == "flex_attention" and not cuda_available:
        attention = "sdpa"  # what load_base falls back to on the CPU
    if config.model_type == "bloom" and attention in FUSED_ALIBI_IMPLEMENTATIONS:
        p += fused_alibi_problems(config, attention)
    wanted = cfg.speed.blocks_without_checkpointing
    if cfg.train.gradient_checkpointing and wanted > 0:
        blocks = len(decoder_blocks(model))
        if wanted > blocks:
            p.append(f"speed.blocks_without_checkpointing={wanted} but the model has {blocks} checkpointed decoder "
                     f"blocks; use a number from 0 to {blocks} (or train.gradient_checkpointing=false for none)")
    if cfg.speed.offload_embeddings:
        p += offload_problems(model, [*cfg.lora.target_modules, *cfg.lora.modules_to_save])
    if cfg.speed.mlp_chunk_size and not all(single_input_mlp(b) for b in decoder_blocks(model)):
        p.append(f"speed.mlp_chunk_size runs a block's MLP on slices of the hidden states, but the MLP of "
                 f"{config.model_type} takes more inputs (e.g. bloom's residual); set speed.mlp_chunk_size=0")
    return p


def lora_module_problems(cfg: Config, module_names: list[str]) -> list[str]:
    """lora.target_modules and lora.modules_to_save entries that name no module of the model."""
    p: list[str] = []
    leaves = {n.rsplit(".", 1)[-1] for n in module_names if n}
    for target in cfg.lora.target_modules:
        if target == "all-linear":
            continue
        if target not in leaves and target not in module_names:
            hint = difflib.get_close_matches(target, sorted(leaves), n=1)
            linear = sorted({n.rsplit(".", 1)[-1] for n in module_names
                             if n.endswith("proj") or "dense" in n or "fc" in n})
            p.append(
                f"lora.target_modules has '{target}', which this model does not have"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; its linear layers include: {', '.join(linear)}"
            )
    for name in cfg.lora.modules_to_save:
        if name not in leaves and name not in module_names:
            p.append(f"lora.modules_to_save has '{name}', which this model does not have")
    return p


def random_init_problems(cfg: Config) -> list[str]:
    """With random_init, the model built is model.architecture; a local name_or_path must be that kind of model.

    (A name_or_path differing from the architecture's own model, model.architecture_of, is refused by
    ModelConfig.problems; this catches a local folder of another kind when no architecture_of is set.)
    """
    m = cfg.model
    config_file = Path(m.name_or_path) / "config.json"
    if not (m.random_init and m.architecture and config_file.is_file()):
        return []
    built_type = m.architecture.get("model_type")
    try:
        named_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return []
    if named_type and named_type != built_type:
        return [f"model.random_init=true builds model.architecture ({built_type}), but model.name_or_path="
                f"{m.name_or_path} is a {named_type} model: add model.architecture=null to build {named_type} "
                "shapes from its config.json, or point model.name_or_path at the architecture's model"]
    return []


def output_dir_problems(run_dir: Path) -> list[str]:
    """Whether the run folder can be created and written: not a file, not under one, writable, not full.

    Writes (and removes) a small probe file in the folder or its nearest existing parent.
    """
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        return [f"output_dir={run_dir} is a file, not a folder: pass another output_dir=..."]
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"output_dir={run_dir} is under {existing}, which is a file: pass another output_dir=..."]
    try:
        fd, probe = tempfile.mkstemp(prefix=".finetune-write-probe-", dir=existing)
    except OSError as e:
        return [_write_problem(run_dir, existing, e)]
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    except OSError as e:
        return [_write_problem(run_dir, existing, e)]
    finally:
        os.close(fd)
        os.unlink(probe)
    return []


def _write_problem(run_dir: Path, existing: Path, e: OSError) -> str:
    where = f"output_dir={run_dir}" + (f" (its parent {existing})" if existing != run_dir else "")
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only filesystem: pass an output_dir=... on a writable disk"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where} is on a full disk (or over quota): free space there or pass another output_dir=..."
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where} is not writable by this user: fix its permissions or pass another output_dir=..."
    return f"{where} cannot be written ({e.strerror or e}): pass another output_dir=..."


class VerifiedOnce:
    """The run folder's verifications for one start: each checkpoint, and the final adapter, is read and
    checksummed once however many checks ask (every file of a large checkpoint is hashed)."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, Path], list[str]] = {}

    def checkpoint(self, folder: Path) -> list[str]:
        """finetune.checkpoint.verify_checkpoint, answered once per folder."""
        from finetune.checkpoint import verify_checkpoint

        return self._once("checkpoint", folder, verify_checkpoint)

    def damaged_adapter(self, run_dir: Path) -> list[str]:
        """What is wrong with the final adapter of the run in `run_dir` (empty if it is whole or absent)."""
        from finetune.atomic import verify_directory

        adapter = run_dir / "adapter"
        return self._once("adapter", adapter, verify_directory) if adapter.exists() else []

    def _once(self, kind: str, folder: Path, check) -> list[str]:
        key = (kind, Path(folder).resolve())
        if key not in self._answers:
            self._answers[key] = check(folder)
        return self._answers[key]


def run_dir_problems(cfg: Config, run_dir: Path, verified: Optional[VerifiedOnce] = None
                     ) -> tuple[list[str], Optional[Path]]:
    """What the run already in `run_dir` allows, and the checkpoint to resume from (None for a new run)."""
    from finetune.atomic import CheckpointError
    from finetune.checkpoint import find_latest_complete, resolve_resume

    verified = verified or VerifiedOnce()
    problems: list[str] = []
    resume_from = None
    if cfg.train.resume:
        try:
            resume_from = resolve_resume(cfg.train.resume, run_dir, verified.checkpoint)
            problems += resume_problems(resume_from, cfg, run_dir, verified)
        except CheckpointError as e:
            problems.append(str(e))
    elif not run_dir.is_dir():
        pass
    elif (run_dir / "adapter").exists():
        problems.append(f"output_dir {run_dir} already holds a finished run; pass another output_dir=..., remove it, "
                        "or add train.resume=auto to train it further (with a larger train.max_steps)")
    elif find_latest_complete(run_dir, verified.checkpoint)[0] is not None:
        problems.append(f"output_dir {run_dir} holds the checkpoints of an interrupted run: go on with it with "
                        "train.resume=auto, or pass another output_dir=...")
    return problems, resume_from


def resume_problems(checkpoint: Path, cfg: Config, run_dir: Path, verified: Optional[VerifiedOnce] = None
                    ) -> list[str]:
    """Why resuming from `checkpoint` into `run_dir` makes no sense (what it was trained on is checked later)."""
    from finetune.checkpoint import find_latest_complete

    verified = verified or VerifiedOnce()
    step = int(checkpoint.name.removeprefix("step-")) if checkpoint.name.startswith("step-") else None
    latest, _ = find_latest_complete(run_dir, verified.checkpoint)
    problems = []
    finished_at = _finished_step(run_dir)
    if step is not None and finished_at is not None and step < finished_at:
        problems.append(f"train.resume: the run in {run_dir} finished at step {finished_at}, but {checkpoint.name} "
                        f"is older: going on from it would redo steps {step + 1}-{finished_at}. Resume into another "
                        "output_dir")
    elif step is not None and step >= cfg.train.max_steps and finished_at is not None:
        if step == cfg.train.max_steps and verified.damaged_adapter(run_dir):
            return problems  # a repair: the final adapter is written again from the last checkpoint
        problems.append(f"train.resume: the run in {run_dir} already finished at step {step} "
                        f"(train.max_steps={cfg.train.max_steps}); raise train.max_steps to train it further")
    elif step is not None and step > cfg.train.max_steps:
        problems.append(f"train.resume: {checkpoint} is at step {step}, past train.max_steps={cfg.train.max_steps}")
    if latest is not None and step is not None and latest.resolve() != checkpoint.resolve():
        latest_step = int(latest.name.removeprefix("step-"))
        if latest_step > step:
            problems.append(
                f"train.resume={cfg.train.resume}: {run_dir} already holds a later checkpoint ({latest.name}); going on "
                "from an older one would mix two histories in one folder. Resume into another output_dir"
            )
    return problems


def resume_notes(cfg: Config, run_dir: Path, resume_from: Optional[Path], verified: Optional[VerifiedOnce] = None
                 ) -> list[str]:
    """What a resume chose and why, said before it starts: newer checkpoints passed over, an adapter repaired."""
    from finetune.checkpoint import find_latest_complete

    if resume_from is None:
        return []
    verified = verified or VerifiedOnce()
    notes = []
    if cfg.train.resume == "auto" or (Path(cfg.train.resume) / "checkpoints").is_dir():
        _, passed_over = find_latest_complete(run_dir if cfg.train.resume == "auto" else Path(cfg.train.resume),
                                              verified.checkpoint)
        notes += [f"train.resume={cfg.train.resume}: skipped {line}; resuming from {resume_from.name} instead"
                  for line in passed_over]
    damaged = verified.damaged_adapter(run_dir)
    if damaged and resume_from.name == f"step-{cfg.train.max_steps:06d}":
        notes.append(f"the final adapter of {run_dir} is damaged ({damaged[0]}): writing it again from "
                     f"{resume_from.name}, the run's last step")
    return notes


def _finished_step(run_dir: Path) -> Optional[int]:
    """The step the run in `run_dir` wrote its final adapter at, or None if it has not finished."""
    from finetune.atomic import MANIFEST

    try:
        return int(json.loads((run_dir / "adapter" / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None if not (run_dir / "adapter").exists() else 0


def notes(cfg: Config) -> list[str]:
    """What preflight adjusted rather than refused, to print once the launch is accepted."""
    return [note for note in (cfg.train.warmup_note(), cfg.speed.fused_lora_note()) if note]


def preflight(cfg: Config, run_dir: Path, cache_dir: Optional[Path] = None) -> tuple[str, Optional[Path]]:
    """Every check that needs no weights, before any weights load; raises one ConfigError with all problems.

    Returns where the weights come from, and the checkpoint to resume from (None for a new run).
    """
    import torch
    from accelerate import PartialState

    from finetune.source import default_cache_dir, resolve_model_source

    run_dir = Path(run_dir)
    cuda = torch.cuda.is_available()
    problems = config_problems(cfg, cuda_available=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    problems += output_dir_problems(run_dir)
    verified = VerifiedOnce()  # the run folder's checkpoints, checksummed once for every check below
    run_problems, resume_from = run_dir_problems(cfg, run_dir, verified)
    problems += run_problems
    mislabelled = random_init_problems(cfg)
    problems += mislabelled
    source = cfg.model.name_or_path
    if not mislabelled and not cfg.model.problems():  # a model in doubt is not resolved (random_init builds it)
        try:
            # Only the main process converts or builds a cached model; the others wait and reuse it.
            with PartialState().main_process_first():
                source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
            problems += model_problems(cfg, source, cuda_available=cuda)
        except (OSError, ValueError, RuntimeError) as e:
            problems.append(f"model.name_or_path={cfg.model.name_or_path!r} could not be read: {e}")
    if problems:
        raise ConfigError(problems)
    if PartialState().is_main_process:
        for note in notes(cfg) + resume_notes(cfg, run_dir, resume_from, verified):
            print(f"[finetune] {note}", flush=True)
    return source, resume_from
