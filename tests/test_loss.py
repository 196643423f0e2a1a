"""The chunked frozen-head loss computes what the plain logits path computes: loss and gradients."""

from __future__ import annotations

import pytest
import torch

from finetune.loss import causal_lm_loss_sum, supports_chunked_loss
from tests.conftest import lora_model, loss_and_grads


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bloom"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("compiled", [False, True])  # speed.compile: each chunk's loss and gradient compiled
def test_chunked_loss_equals_plain_loss_and_gradients(arch, autocast, compiled, request, tokenizer):
    model_dir = request.getfixturevalue(arch)
    compute = "bfloat16" if autocast else "float32"
    model = lora_model(model_dir, f"quant.compute_dtype={compute}")
    assert supports_chunked_loss(model)
    enc = tokenizer(["What is the capital of France? Paris.", "The quick brown fox jumps"], return_tensors="pt",
                    padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[0, :8] = -100  # a masked prompt
    assert (labels[:, 1:].reshape(-1)[:7] == -100).all()  # the first chunk has no labelled token
    batch = {**enc, "labels": labels}
    plain_loss, plain_grads = loss_and_grads(model, batch, 0, autocast)
    chunk_loss, chunk_grads = loss_and_grads(model, batch, 7, autocast, compiled)  # chunks straddle rows
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunk_loss, plain_loss, **tol)
    assert plain_grads.keys() == chunk_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], msg=name, **tol)


def test_trainable_head_falls_back_to_the_plain_path(tiny_llama):
    model = lora_model(tiny_llama, "lora.modules_to_save=[lm_head]")
    assert not supports_chunked_loss(model)


@pytest.mark.parametrize("arch, adapter_key", [
    ("tiny_llama", "layers.0.self_attn.q_proj.lora_A.default.weight"),
    ("tiny_bloom", "h.0.self_attention.query_key_value.lora_A.default.weight"),  # BLOOM: fused SDPA ALiBi
])
@pytest.mark.parametrize("kept, cuda_graphs", [
    (0, False), (1, False),  # speed.blocks_without_checkpointing: one block of each kind
    (1, True),  # speed.cuda_graphs on the CPU: Inductor has no CUDA graphs there and runs the blocks compiled
])
def test_compiled_blocks_give_the_eager_loss_and_gradients(arch, adapter_key, kept, cuda_graphs, request, tokenizer,
                                                           fresh_compile_cache):
    from torch._dynamo.utils import counters

    from finetune.speed.compile import compile_blocks

    model = lora_model(request.getfixturevalue(arch), "speed.fp32_frozen=false",
                       f"speed.blocks_without_checkpointing={kept}")
    model.train()  # checkpointing only applies in training (no dropout here: lora_model sets none)
    enc = tokenizer(["What is the capital of France? Paris.", "The quick brown fox"], return_tensors="pt",
                    padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    batch = {**enc, "labels": labels}
    eager_loss, eager_grads = loss_and_grads(model, batch, 16, autocast=True)
    assert compile_blocks(model, cuda_graphs) == 2
    compiled_loss, compiled_grads = loss_and_grads(model, batch, 16, autocast=True)
    assert counters["stats"]["unique_graphs"] == 1 + kept  # the blocks ran compiled, each kind its own graph
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=0)
    # Inductor keeps fused elementwise math in fp32 where eager rounds to bf16 between ops: compare
    # the gradients as one vector by relative error, which bf16 rounding keeps near 1e-2.
    eager = torch.cat([g.flatten() for g in eager_grads.values()])
    compiled = torch.cat([compiled_grads[n].flatten() for n in eager_grads])
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
    # adapter weights keep their names, so saved adapters load anywhere
    assert any(k.endswith(adapter_key) for k in model.state_dict())
    # evaluation runs the blocks without checkpointing and computes the same loss
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(causal_lm_loss_sum(model, batch, 16), eager_loss, rtol=1e-3, atol=0)


def test_bf16_frozen_weights_change_the_loss_only_by_rounding(tiny_llama, tokenizer):
    enc = tokenizer(["What is the capital of France? Paris."], return_tensors="pt")
    batch = {**enc, "labels": enc["input_ids"].clone()}
    fp32_loss, _ = loss_and_grads(lora_model(tiny_llama), batch, 0, autocast=True)
    bf16_loss, _ = loss_and_grads(lora_model(tiny_llama, "speed.fp32_frozen=false"), batch, 0, autocast=True)
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=1e-2, atol=0)
