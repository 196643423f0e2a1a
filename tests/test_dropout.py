"""LoRA dropout from a hash (speed.hash_dropout, finetune/speed/dropout.py).

The mask is an exact integer function of (seed, row, column): checked against an independent numpy
uint32 implementation of murmur3's finalizer, eager and compiled, on the CPU and (where there is
one) on a CUDA GPU; it has dropout's statistics; forward and backward use one mask; and compiled
LoRA blocks with it give the eager loss and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.speed.dropout import HashDropout, hash_lora_dropouts, keep_mask
from tests.conftest import lora_model, loss_and_grads


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def reference_keep_mask(shape: tuple, seed: int, p: float) -> np.ndarray:
    """keep_mask in unsigned 32-bit numpy arithmetic, written from the hash's definition."""
    rows, columns = int(np.prod(shape[:-1])), shape[-1]
    with np.errstate(over="ignore"):
        row_hash = _fmix32(np.arange(rows, dtype=np.uint32)[:, None] * np.uint32(0x9E3779B9)
                           + np.uint32(seed % 2**32))
        h = _fmix32(row_hash ^ (np.arange(columns, dtype=np.uint32) * np.uint32(0x27D4EB2F)))
    # keep_mask compares the hash as a signed int32: flipping the top bit orders it the same way unsigned
    return ((h ^ np.uint32(2**31)) >= np.uint32(round(p * 2**32))).reshape(shape)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_mask_is_the_hash_eager_and_compiled(device, fresh_compile_cache):
    shape = torch.Size([3, 257, 129])
    compiled = torch.compile(keep_mask, dynamic=False)
    for seed in [0, 1, -5, 2**31 - 2, -2**31]:
        expected = torch.from_numpy(reference_keep_mask(tuple(shape), seed, 0.05))
        seed_tensor = torch.tensor(seed, dtype=torch.int32, device=device)
        assert torch.equal(keep_mask(shape, seed_tensor, 0.05).cpu(), expected), seed
        assert torch.equal(compiled(shape, seed_tensor, 0.05).cpu(), expected), seed


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_mask_has_dropout_statistics(p):
    n = 2048
    keep = keep_mask(torch.Size([n, n]), torch.tensor(12345, dtype=torch.int32), p).double()
    sigma = (p * (1 - p) / n**2) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # neighbours along rows, along columns and in the next seed's mask are independent: both dropped
    # with probability p^2 (five standard deviations of that estimate)
    dropped = 1 - keep
    other = 1 - keep_mask(torch.Size([n, n]), torch.tensor(12346, dtype=torch.int32), p).double()
    for pair in [dropped[:, 1:] * dropped[:, :-1], dropped[1:] * dropped[:-1], dropped * other]:
        tolerance = 5 * (p**2 * (1 - p**2) / pair.numel()) ** 0.5
        assert abs(pair.mean().item() - p**2) < tolerance
    # each column is dropped at the same rate (no column is favoured by the column hash)
    per_column = dropped.mean(0)
    assert (per_column - p).abs().max().item() < 6 * (p * (1 - p) / n) ** 0.5


def test_forward_and_backward_use_one_mask():
    dropout = HashDropout(0.2)
    x = (torch.rand(64, 96) + 0.5).requires_grad_()  # no zeros: y == 0 marks exactly the dropped elements
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    assert 0.1 < 1 - kept.float().mean().item() < 0.3
    (y * 3).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 3 / 0.8)
    assert not torch.equal(dropout(x) != 0, kept)  # a fresh seed each call
    dropout.eval()
    assert dropout(x) is x


def _batch(tokenizer) -> dict:
    enc = tokenizer(["What is the capital of France? Paris.", "The quick brown fox"], return_tensors="pt",
                    padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def test_compiled_blocks_with_hash_dropout_give_the_eager_loss_and_gradients(tiny_llama, tokenizer,
                                                                              fresh_compile_cache):
    from finetune.speed.compile import compile_blocks

    # without checkpointing, so that the compiled blocks draw their seeds as eager code does
    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "train.gradient_checkpointing=false", "lora.dropout=0.3")
    layers = sum(1 for name, _ in model.named_modules() if name.endswith("lora_dropout"))
    assert hash_lora_dropouts(model) == layers > 0
    model.train()
    batch = _batch(tokenizer)

    def step():
        torch.manual_seed(7)  # the same seeds for the masks on both sides
        return loss_and_grads(model, batch, 16, autocast=True)

    eager_loss, eager_grads = step()
    compile_blocks(model)
    # Inductor draws the seeds with torch's own generator here, so both sides see the same masks
    with torch._inductor.config.patch(fallback_random=True):
        compiled_loss, compiled_grads = step()
        torch.manual_seed(8)  # and the masks matter: another draw, another loss
        other_loss, _ = loss_and_grads(model, batch, 16, autocast=True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=0)
    eager = torch.cat([g.flatten() for g in eager_grads.values()])
    compiled = torch.cat([compiled_grads[n].flatten() for n in eager_grads])
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
    assert abs(other_loss.item() - eager_loss.item()) > 1e-2


class _DropoutBlock(torch.nn.Module):
    """A block whose output shows its dropout mask: dropout(x) * w."""

    def __init__(self, width: int):
        super().__init__()
        self.dropout = HashDropout(0.3)
        self.w = torch.nn.Parameter(torch.linspace(1.0, 2.0, width))

    def forward(self, x):
        return self.dropout(x) * self.w


@pytest.mark.parametrize("keep", [False, True])  # checkpointed; without checkpointing (selective policy)
def test_compiled_checkpointed_blocks_recompute_the_masks_of_their_forward(keep, fresh_compile_cache):
    """Checkpointed compiled blocks recompute the dropout in backward from the saved seed: the
    gradient must carry the mask the forward pass used (a redrawn mask would differ in ~40% of places)."""
    from finetune.speed.recompute import checkpoint_inside, keep_matmul_outputs

    block = _DropoutBlock(96)
    checkpoint_inside([block], keep=keep_matmul_outputs(frozenset({8})) if keep else None)
    block.compile(dynamic=False)
    for _ in range(2):  # and a fresh mask each step
        x = (torch.rand(64, 96) + 0.5).requires_grad_()
        y = block(x)
        kept = y != 0
        assert 0.2 < 1 - kept.float().mean().item() < 0.4
        y.sum().backward()
        torch.testing.assert_close(x.grad, kept.float() * block.w.detach() / 0.7)
        torch.testing.assert_close(block.w.grad, (x.detach() * kept / 0.7).sum(0))
        block.w.grad = None
