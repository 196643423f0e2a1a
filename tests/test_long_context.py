"""The long-context options compute what the plain checkpointed path computes: loss and gradients.

speed.mlp_chunk_size runs each MLP on slices of the sequence; speed.offload_checkpoints keeps each
checkpointed block's input in CPU memory and reruns the block in backward, which must draw the
forward's dropout masks again.
"""

from __future__ import annotations

import torch

from finetune.speed.compile import decoder_blocks
from tests.conftest import lora_model, loss_and_grads


def _batch() -> dict:
    ids = torch.randint(3, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _assert_same(model_a, model_b, batch: dict, autocast: bool = True, max_relative: float = 0.0) -> None:
    """Equal losses and gradients: bit for bit, or each gradient within `max_relative` of the first's norm."""
    for model in (model_a, model_b):
        model.train()
    torch.manual_seed(1)
    loss_a, grads_a = loss_and_grads(model_a, batch, 0, autocast)
    torch.manual_seed(1)
    loss_b, grads_b = loss_and_grads(model_b, batch, 0, autocast)
    assert abs(float(loss_b) - float(loss_a)) <= max_relative * abs(float(loss_a))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    # every block's adapters learn, the first block's too (its input needs no gradient)
    first = [n for n in grads_b if ".layers.0." in n]
    assert first and all(grads_b[n].abs().sum() > 0 for n in first)
    for name in grads_a:
        assert (grads_b[name] - grads_a[name]).norm() <= max_relative * grads_a[name].norm(), name


def test_offloaded_checkpoints_give_the_plain_loss_and_gradients_with_dropout(tiny_llama):
    # lora_model seeds the adapters: both models start equal
    plain = lora_model(tiny_llama, "lora.dropout=0.1")
    offloaded = lora_model(tiny_llama, "lora.dropout=0.1", "speed.offload_checkpoints=true")
    _assert_same(plain, offloaded, _batch())


def test_mlp_slices_give_the_plain_loss_and_gradients(tiny_llama):
    # fp32 arithmetic: only the order of the weight gradients' sums over tokens changes (about 5e-7)
    fp32 = ("quant.compute_dtype=float32", "train.mixed_precision=no")
    plain, sliced = lora_model(tiny_llama, *fp32), lora_model(tiny_llama, *fp32, "speed.mlp_chunk_size=5")
    _assert_same(plain, sliced, _batch(), autocast=False, max_relative=1e-5)


def test_offloaded_blocks_with_mlp_slices_replay_the_slices_dropout(tiny_llama):
    sliced = lora_model(tiny_llama, "lora.dropout=0.1", "speed.mlp_chunk_size=5")
    both = lora_model(tiny_llama, "lora.dropout=0.1", "speed.mlp_chunk_size=5", "speed.offload_checkpoints=true")
    _assert_same(sliced, both, _batch())
    blocks = decoder_blocks(both)
    assert all(getattr(b.mlp, "finetune_chunk", None) == 5 for b in blocks)
    assert all(b._gradient_checkpointing_func.__name__ == "offloaded_checkpoint" for b in blocks)
