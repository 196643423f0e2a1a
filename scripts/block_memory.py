"""What each decoder block keeps for its backward pass: bytes and tensors, per kind of block.

    python scripts/block_memory.py --shape llama3.2-1b --batch 2 --seq 2048 speed=fast speed.blocks_without_checkpointing=4

Builds the shape with random weights (as scripts/bench.py does), runs one training forward under
autocast with the recipe overrides given, and prints, for each kind of block (checkpointed, without checkpointing),
the distinct tensors it saved for backward (parameters and 4-bit weights left out) by shape and dtype.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LORA_ALPHA, LORA_DROPOUT, LORA_R, SHAPES, build_random_model, make_batches, make_examples  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--cache", default="/tmp/finetune-bench")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from finetune.loss import batch_on_device, causal_lm_loss_sum
    from finetune.model import load_base, prepare_for_training
    from finetune.run import compose
    from finetune.speed.compile import checkpointing_of, compile_blocks, decoder_blocks, keep_activations_of_last_blocks
    from finetune.speed.recompute import distinct, distinct_bytes, saved_tensors_by_block

    model_dir = str(build_random_model(args.shape, Path(args.cache) / args.shape))
    cfg = compose([f"model.name_or_path={model_dir}", "quant=nf4", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
                   f"lora.dropout={LORA_DROPOUT}", "lora.target_modules=[all-linear]", "output_dir=/tmp/unused",
                   *args.overrides])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    # Built step by step (finetune.model.build_model in pieces) to read each block's kind before
    # compile_blocks takes checkpointing over.
    model = prepare_for_training(load_base(cfg.model, cfg.quant, model_dir, device), cfg.lora, cfg.quant,
                                 gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 fp32_frozen=cfg.speed.fp32_frozen)
    keep_activations_of_last_blocks(model, cfg.speed.blocks_without_checkpointing)
    kinds = [checkpointing_of(b) for b in decoder_blocks(model)]
    if cfg.speed.compile:
        compile_blocks(model)
    model.train()
    batch = make_batches(make_examples(args.batch, args.seq, args.seq), args.batch, args.seq, False)[0]
    batch = batch_on_device(batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    # A first step (which compiles) records what each block saves; it holds on to those tensors
    # through backward, so the memory is measured on a second step, recording nothing.
    with saved_tensors_by_block(decoder_blocks(model)) as saved, autocast:
        causal_lm_loss_sum(model, batch, cfg.speed.loss_chunk_size, cfg.speed.compile).backward()
    lines = []
    for kind in dict.fromkeys(kinds):  # each kind once, in block order
        tensors = saved[kinds.index(kind)]
        groups = Counter((tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in distinct(tensors))
        lines.append(f"block {kinds.index(kind)} ({kind}): {distinct_bytes(tensors) / 2**20:,.2f} MiB in "
                     f"{sum(groups.values())} tensors")
        lines += [f"    {n} x {list(shape)} {dtype}"
                  for (shape, dtype), n in sorted(groups.items(), key=lambda kv: -kv[1] * torch.Size(kv[0][0]).numel())]
    del saved, tensors
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        with autocast:
            loss = causal_lm_loss_sum(model, batch, cfg.speed.loss_chunk_size, cfg.speed.compile)
        print(f"memory after forward {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
        loss.backward()
        print(f"peak memory of a training step {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"{args.shape} b{args.batch} s{args.seq} {' '.join(args.overrides)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
