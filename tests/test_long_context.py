"""The long-context options compute what the plain checkpointed path computes: loss and gradients.

speed.mlp_chunk_size runs each MLP on slices of the sequence; speed.offload_checkpoints keeps each
checkpointed block's input in CPU memory and reruns the block in backward. With dropout, the rerun
must draw the forward's masks again.
"""

from __future__ import annotations

import pytest
import torch

from finetune.speed.compile import decoder_blocks
from tests.conftest import lora_model, loss_and_grads

OPTIONS = {
    "mlp_chunks": ("speed.mlp_chunk_size=5",),
    "offload": ("speed.offload_checkpoints=true",),
    "both": ("speed.mlp_chunk_size=5", "speed.offload_checkpoints=true"),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_long_context_options_give_the_plain_loss_and_gradients(option, tiny_llama):
    batch = {"input_ids": torch.randint(3, 100, (2, 23)), "attention_mask": torch.ones(2, 23, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    common = ("lora.dropout=0.1",)  # the rerun must redraw the forward's dropout masks
    plain, fast = lora_model(tiny_llama, *common), lora_model(tiny_llama, *common, *OPTIONS[option])
    fast.load_state_dict(plain.state_dict())
    for model in (plain, fast):
        model.train()
    torch.manual_seed(1)
    plain_loss, plain_grads = loss_and_grads(plain, batch, 0, autocast=True)
    torch.manual_seed(1)
    fast_loss, fast_grads = loss_and_grads(fast, batch, 0, autocast=True)
    assert fast_loss == plain_loss
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 0
    # every block's adapters learn, the first block's too (its input needs no gradient)
    first = [n for n in fast_grads if ".layers.0." in n]
    assert first and all(fast_grads[n].abs().sum() > 0 for n in first)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], msg=name, rtol=1e-5, atol=1e-6)


def test_the_options_are_wired_to_every_block(tiny_llama):
    model = lora_model(tiny_llama, "speed.mlp_chunk_size=5", "speed.offload_checkpoints=true")
    blocks = decoder_blocks(model)
    assert all(getattr(b.mlp, "finetune_chunk", None) == 5 for b in blocks)
    assert all(b._gradient_checkpointing_func.__name__ == "offloaded_checkpoint" for b in blocks)
