"""LoRA dropout whose mask is a hash of (seed, row, column) (speed.hash_dropout).

PEFT drops out each LoRA layer's input with nn.Dropout. Compiled, that draws one Philox counter per
element, in the forward pass and again wherever backward regenerates the mask: on an H200 the seven
dropouts of a llama3-8b block cost 7% of a step (docs/decisions.md), mostly integer work for the
random numbers, not memory traffic. Here each element's keep bit is the murmur3 32-bit finalizer of
its row hash and column, a dozen integer operations that Inductor fuses into the kernels around it,
and that backward recomputes from the one saved seed instead of keeping a mask.

The distribution is dropout's: each element kept with probability 1 - p (to 2**-32), independently
of the others as far as a 32-bit hash mixes them, scaled by 1 / (1 - p); a fresh seed each call. The
masks differ from torch's random stream, as a compiled nn.Dropout's already do.
"""

from __future__ import annotations

import torch

# murmur3's fmix32 multipliers and the 32-bit golden ratio, as signed int32 (int32 products wrap).
_FMIX_1 = 0x85EBCA6B - 2**32
_FMIX_2 = 0xC2B2AE35 - 2**32
_GOLDEN = 0x9E3779B9 - 2**32
_COLUMN = 0x27D4EB2F


def _shift_right(h: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's >> on signed ints copies the sign bit)."""
    return (h >> bits) & ((1 << (32 - bits)) - 1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer: every output bit depends on every input bit."""
    h = h ^ _shift_right(h, 16)
    h = h * _FMIX_1
    h = h ^ _shift_right(h, 13)
    h = h * _FMIX_2
    return h ^ _shift_right(h, 16)


def keep_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep mask for a tensor of `shape`: True with probability 1 - p, from `seed` (int32 scalar tensor).

    Rows are the flattened leading dimensions, columns the last one, so any size fits in int32 indices.
    """
    columns = shape[-1]
    rows = torch.arange(max(1, shape.numel() // max(columns, 1)), device=seed.device, dtype=torch.int32)
    row_hash = _fmix32(rows.view(-1, 1) * _GOLDEN + seed)
    h = _fmix32(row_hash ^ (torch.arange(columns, device=seed.device, dtype=torch.int32) * _COLUMN))
    # h is uniform over the int32 range: keep the values at or above the lowest p share of it.
    return (h >= -2**31 + round(p * 2**32)).view(shape)


class HashDropout(torch.nn.Module):
    """nn.Dropout's contract (train: zero with probability p, scale the rest by 1/(1-p); eval: identity)
    with the mask from keep_mask and a fresh seed per call."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"HashDropout needs 0 < p < 1 (got {p}); p = 0 is no dropout at all")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        seed = torch.randint(-2**31, 2**31 - 1, (), device=x.device, dtype=torch.int32)
        return x * keep_mask(x.shape, seed, self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def hash_lora_dropouts(model: torch.nn.Module) -> int:
    """Replace the nn.Dropout of every LoRA layer (peft's `lora_dropout` ModuleDicts) with a HashDropout
    of the same p; returns how many were replaced. p = 0 layers keep peft's Identity."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = HashDropout(dropout.p)
                replaced += 1
    return replaced
