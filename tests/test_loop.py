"""finetune.loop's pieces around the step: steps queued back to back, and recording CUDA graphs before
the first step."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from finetune.config import SpeedConfig, TrainConfig
from finetune.loop import Steps, build_optimizer, build_scheduler, record_cuda_graphs, train_step
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


def _steps_of(run_steps) -> tuple[list, list, list]:
    """A tiny Llama (dropout in its attention, so every step draws random numbers) trained for six steps
    by `run_steps(model, optimizer, scheduler, accelerator, params, batches)`, with a linear LR schedule
    and a batch whose token has a NaN embedding at step 3 (a non-finite step, skipped on the device and
    not advancing the schedule). Returns the outcomes, the LR after each step and the final parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.2))
    with torch.no_grad():
        model.get_input_embeddings().weight[31] = float("nan")
    model.get_input_embeddings().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    train = TrainConfig(warmup_steps=0, lr_scheduler="linear", max_steps=6, lr=1e-2)
    optimizer = build_optimizer(params, train)
    scheduler = build_scheduler(optimizer, train)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(1, 7):
        ids = torch.randint(0, 31, (2, 8), generator=generator)
        ids[0, 3] = 31 if step == 3 else ids[0, 3]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    lrs = []
    scheduler_step = scheduler.step
    scheduler.step = lambda: (scheduler_step(), lrs.append(scheduler.get_last_lr()[0]))[0]
    outcomes = run_steps(model, optimizer, scheduler, accelerator, params, batches)
    return outcomes, lrs, [p.detach().clone() for p in params]


def test_steps_queued_back_to_back_compute_what_steps_one_at_a_time_do():
    # Steps reads a step's numbers (and takes its LR schedule step) only once the next step's forward
    # and backward are queued, before that step's update: the same losses, random draws, schedule
    # and parameters as reading each step before the next begins.
    speed = SpeedConfig(loss_chunk_size=0)

    def one_at_a_time(model, optimizer, scheduler, accelerator, params, batches):
        return [train_step(model, optimizer, scheduler, [b], accelerator=accelerator, params=params, speed=speed,
                           max_grad_norm=1.0) for b in batches]

    def back_to_back(model, optimizer, scheduler, accelerator, params, batches):
        steps = Steps(model, optimizer, scheduler, accelerator=accelerator, params=params, speed=speed,
                      max_grad_norm=1.0)
        outcomes = [steps.queue([b]) for b in batches]
        assert outcomes[0] is None and steps.can_overlap()  # each call returned the step before it
        return outcomes[1:] + [steps.finish()]

    expected, expected_lrs, expected_params = _steps_of(one_at_a_time)
    got, lrs, params = _steps_of(back_to_back)
    assert [o.finite for o in got] == [True, True, False, True, True, True]
    assert [(o.loss, o.grad_norm) for o in got if o.finite] == [(o.loss, o.grad_norm) for o in expected if o.finite]
    assert lrs == expected_lrs and len(lrs) == 5  # the non-finite step took no schedule step
    assert all(torch.equal(a, b) for a, b in zip(params, expected_params))
    assert all(o.seconds > 0 for o in got)
