"""Several processes on one run: the Accelerator for the launch, DDP or FSDP2, and the gathers they need.

`torchrun` / `accelerate launch` start the ranks; accelerate forms the process group (nccl on GPUs,
gloo on the CPU). dist.strategy picks how the ranks share the work:

    ddp   every rank holds the whole quantized base; DDP averages the LoRA gradients
    fsdp  FSDP2 (`fully_shard` per decoder block, through accelerate's plugin): 4-bit weights stored
          as bfloat16, LoRA weights and optimizer state sharded across ranks, bf16 mixed precision

The same accelerate FSDP2 code runs on GPUs and on CPU ranks (gloo), so CI tests it multi-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from finetune.config import Config


def fsdp_wanted(cfg: Config) -> bool:
    return cfg.dist.strategy == "fsdp"


def fsdp_plugin(cfg: Config):
    """accelerate's FSDP2 plugin for dist.strategy=fsdp, or None.

    Sharded per decoder block (transformer_based_wrap; the block class is set once the model is
    built, `set_wrap_class`), parameters resharded after each block's forward, sharded state dicts.
    Activation checkpointing is the model's own (train.gradient_checkpointing), which runs under
    FSDP2 as under one process; the plugin's would checkpoint every block a second time.
    """
    if not fsdp_wanted(cfg):
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT", activation_checkpointing=False,
        cpu_offload=cfg.dist.cpu_offload,
    )


def make_accelerator(cfg: Config, run_dir: Path, mixed_precision: str) -> Accelerator:
    """The run's Accelerator: one process, DDP or FSDP2 over this launch's ranks."""
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),  # as run.process_state: CPU ranks form one gloo job
        log_with="wandb" if cfg.log.wandb else None,
        project_dir=str(run_dir),
        fsdp_plugin=fsdp_plugin(cfg),
    )
    _fsdp_on_cpu_ranks(accelerator, cfg)
    return accelerator


def _fsdp_on_cpu_ranks(accelerator: Accelerator, cfg: Config) -> None:
    """Turn FSDP on for CPU ranks, which accelerate silently leaves on DDP.

    accelerate takes its FSDP branch only for GPU-like process groups (AcceleratorState); this does
    what that branch does, so the CPU runs the same accelerate FSDP2 code as a GPU. Pinned by
    tests/test_distributed.py ("FSDP2 over gloo" on the start screen): an accelerate that changes
    this fails there.
    """
    state = accelerator.state
    plugin = fsdp_plugin(cfg)
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    # A later AcceleratorState() copies PartialState's fields over its own, so both must say FSDP.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    if state._mixed_precision != "no":
        plugin.set_mixed_precision(state._mixed_precision)
    state.fsdp_plugin = plugin


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def set_wrap_class(accelerator: Accelerator, block_class_name: str) -> None:
    """Shard per decoder block of this class (FSDP only; before `accelerator.prepare`)."""
    if is_fsdp(accelerator):
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [block_class_name]


def strategy(accelerator: Accelerator) -> str:
    """For the start screen: "single process", "DDP over gloo", "FSDP2 over nccl", ..."""
    if accelerator.num_processes == 1 and not is_fsdp(accelerator):
        return "single process"
    kind = "FSDP2" if accelerator.is_fsdp2 else "FSDP1" if is_fsdp(accelerator) else "DDP"
    offloaded = is_fsdp(accelerator) and type(accelerator.state.fsdp_plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    offload = ", parameters offloaded to the CPU" if offloaded else ""
    return f"{kind} over {accelerator.state.backend}{offload}"


def full_adapter_state(accelerator: Accelerator, model) -> Optional[dict]:
    """Under FSDP, the whole LoRA state, on the CPU of every rank (a collective: every rank calls it); else None.

    FSDP2 keeps each rank's shard of every parameter as a DTensor, which PEFT cannot write; this
    gathers the trainable ones (the frozen base stays sharded).
    """
    if not is_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
