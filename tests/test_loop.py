"""finetune.loop's pieces around the step: recording CUDA graphs before the first step."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from finetune.config import SpeedConfig
from finetune.loop import record_cuda_graphs
from finetune.speed.compile import compile_blocks
from tests.conftest import lora_model


def test_recording_before_the_first_step_leaves_no_trace_on_the_steps(tiny_llama):
    # speed.cuda_graphs runs two passes before the first step (finetune.loop.record_cuda_graphs). On
    # the CPU (no graphs) the same two passes run through compiled blocks with dropout: afterwards
    # no gradient is left, the parameters and the random generators are as they were, so the first
    # step computes what it would have.
    model = lora_model(tiny_llama, "lora.dropout=0.1")
    compile_blocks(model, SpeedConfig(compile=True))
    model.train()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    seconds = record_cuda_graphs(model, batch, accelerator=Accelerator(cpu=True), speed=SpeedConfig(compile=True),
                                 objective=None)
    assert seconds > 0
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
