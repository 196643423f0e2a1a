"""What compiled decoder blocks keep for their backward pass (finetune.speed.recompute).

Never a dequantized 4-bit weight; a checkpointed block keeps little more than its input; a block
without checkpointing keeps its matmul outputs, not the elementwise work between them.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from finetune.speed.compile import compile_blocks, decoder_blocks
from finetune.speed.recompute import distinct_bytes, saved_tensors_by_block
from tests.conftest import ROOT, lora_model

pytestmark = pytest.mark.usefixtures("fresh_compile_cache")


def _saved_by_block(model, input_ids: torch.Tensor) -> list[list[torch.Tensor]]:
    """The tensors each decoder block saves for backward in one training step."""
    with saved_tensors_by_block(decoder_blocks(model)) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids).logits.float().sum().backward()
    return saved


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bloom"])
def test_compiled_blocks_keep_less_than_the_compiler_chooses_alone(arch, request):
    input_ids = torch.randint(3, 100, (2, 21))
    # what torch.compile keeps on its own, for blocks compiled without any checkpointing
    settings = ("speed.fp32_frozen=false", "lora.dropout=0.05")  # dropout as in real runs: masks to keep or redraw
    plain = lora_model(request.getfixturevalue(arch), *settings, "train.gradient_checkpointing=false")
    plain.train()
    for block in decoder_blocks(plain):
        block.compile()
    by_compiler = distinct_bytes(_saved_by_block(plain, input_ids)[0])

    model = lora_model(request.getfixturevalue(arch), *settings, "speed.blocks_without_checkpointing=1")
    model.train()
    compile_blocks(model)
    checkpointed, kept = (distinct_bytes(s) for s in _saved_by_block(model, input_ids))
    print(f"{arch}: saved by a block compiled alone {by_compiler:,} bytes, checkpointed {checkpointed:,}, "
          f"without checkpointing {kept:,}")
    hidden_state = 2 * 21 * model.config.hidden_size * 2  # the block's bf16 input
    # a checkpointed block: its input, the rotary/ALiBi tables and random seeds
    assert checkpointed < 1.5 * hidden_state < kept < 0.6 * by_compiler


def test_a_block_without_checkpointing_keeps_its_matmul_outputs(tiny_llama):
    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "speed.blocks_without_checkpointing=1")
    model.train()
    compile_blocks(model)
    _, kept = _saved_by_block(model, torch.randint(3, 100, (2, 21)))
    shapes = [tuple(t.shape) for t in kept]
    inner, kv = model.config.intermediate_size, model.config.num_key_value_heads * model.config.head_dim
    assert shapes.count((2, 21, inner)) == 2  # gate and up: what SiLU's backward needs
    assert shapes.count((2, 21, kv)) == 2  # k and v
    # LoRA's rank-r down-projections are kept, its full-width up-projections recomputed from them
    rank = model.peft_config["default"].r
    assert (42, rank) in shapes and not [s for s in shapes if len(s) == 2 and s[1] > rank]


def test_block_memory_script_reports_both_kinds_of_block(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "block_memory.py"), "--shape", "tiny-llama", "--seq", "256",
         "--cache", str(tmp_path), "speed=fast", "speed.blocks_without_checkpointing=2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sizes = dict(re.findall(r"block \d+ \(([\w ]+)\): ([\d.]+) MiB", out.stdout))
    assert sizes.keys() == {"checkpointed", "without checkpointing"}
    assert float(sizes["without checkpointing"]) > float(sizes["checkpointed"]) > 0


def test_without_gradient_checkpointing_blocks_compile_as_they_are(tiny_llama):
    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "train.gradient_checkpointing=false")
    compile_blocks(model)
    assert not any(hasattr(b, "finetune_keeps_outputs") for b in decoder_blocks(model))


def test_checkpointing_inside_keeps_a_hook_that_replaced_the_forward(tiny_llama):
    from accelerate.hooks import ModelHook, add_hook_to_module

    from finetune.speed.recompute import checkpoint_inside

    class CountCalls(ModelHook):  # as accelerate's device-placement hooks do, per instance
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    model.train()
    blocks = decoder_blocks(model)
    add_hook_to_module(blocks[0], CountCalls())
    checkpoint_inside(blocks, keep=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(3, 100, (1, 9))).logits.float().sum().backward()
    assert CountCalls.calls == 2  # the forward and its recompute


def test_samples_before_training_do_not_use_up_the_compiles(tiny_llama, tokenizer):
    from torch._dynamo.utils import counters

    from finetune.generate import generate_samples
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={tiny_llama}", "output_dir=/tmp/unused", "sample.prompts=[Hello there]",
                   "sample.max_new_tokens=6"])
    model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    compile_blocks(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate_samples(model, tokenizer, cfg.data, cfg.sample, "text")
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_blocks_compile_once_per_width_never_symbolically(tiny_llama):
    """torch 2.11's partitioner fails on these checkpointed blocks for symbolic widths (on the H100),
    so each batch width gets its own static graph, and the recompile limit holds them all."""
    from torch._dynamo.utils import counters

    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "speed.blocks_without_checkpointing=1")
    model.train()
    compile_blocks(model, widths=32)
    assert torch._dynamo.config.recompile_limit >= 2 * 2 * 2 * 32
    for width in (16, 32, 48):  # automatic dynamic shapes would make the third a symbolic recompile of the second
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.randint(3, 100, (2, width))).logits.float().sum().backward()
    assert counters["stats"]["unique_graphs"] == 2 * 3  # two kinds of block x three widths
