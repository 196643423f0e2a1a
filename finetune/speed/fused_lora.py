"""LoRA layers whose low-rank path runs in fused kernels (speed.fused_lora).

PEFT computes a LoRA layer as `result = base(x); result = result + lora_B(lora_A(dropout(x))) * s`.
For a llama3-8b block on an H200 that is a quarter of the step (docs/decisions.md), almost none of it
the rank-r arithmetic: each of the seven adapted projections writes a dropped copy of its full-width
input, reads it for the down-projection, writes the full-width up-projection and adds it in another
pass; backward regenerates the mask, writes the full-width input gradient and masks it in a pass of
its own. Here:

- the down-projection is one Triton kernel (finetune/speed/lora_kernels.py) that applies the dropout
  mask to x while its tile is loaded: the dropped copy never exists, and backward's two kernels
  (gradient of A, gradient of x) recompute the mask the same way from the call's seed;
- the up-projection is added into the frozen layer's output by the matmul itself (`addmm`), so the
  full-width result is written once, not three times.

The dropout keeps each element with probability 1 - p and scales by 1 / (1 - p), as nn.Dropout does,
from a fresh seed per call; the mask is a hash of (seed, row, column), so its draws differ from
torch's random stream (as a compiled nn.Dropout's already do). Without dropout the layer computes what
PEFT's does. Both are tested on the CPU, where Triton's interpreter runs the same kernels
(TRITON_INTERPRET=1, tests/test_fused_lora.py).
"""

from __future__ import annotations

import os
import types

import torch

# The ops are registered here without importing Triton (finetune.speed.recompute names them); the
# kernels load on first use.


# Tile sizes, warps and pipeline stages per kernel; scripts/fused_lora_check.py --sweep times the
# alternatives on a GPU (docs/decisions.md has the H200's times: each within 6% of the sweep's best).
LAUNCH = {
    "down": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1),
    "grad_input": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1),
    "grad_weight": dict(BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=1),
}
WAVES = 4  # programs per streaming multiprocessor that the split reductions aim for


def _splits(length: int, block: int, other_blocks: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, length per split, a multiple of block) that cut `length` so that splits x other_blocks
    programs fill the GPU's streaming multiprocessors WAVES times over: a reduction too long for a
    full grid is done in parts (fp32 partial sums, added after in a fixed order, so no atomics and the
    same inputs give the same result bit for bit)."""
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    splits = max(1, min(-(-WAVES * processors // other_blocks), -(-length // block)))
    per_split = -(-length // splits // block) * block
    return -(-length // per_split), per_split


def _shared_arguments(p: float, r: int, x: torch.Tensor) -> dict:
    """The dropout, rank and precision arguments every kernel takes. fp32 inputs get exact fp32 dot
    products (not TF32); off the GPU (Triton's interpreter) dot products run in fp32."""
    return dict(threshold=-2**31 + round(p * 2**32), scale=1.0 / (1.0 - p), R=r, R_PAD=max(16, 1 << (r - 1).bit_length()),
                DROPOUT=p > 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=not x.is_cuda)


@torch.library.custom_op("finetune::lora_down", mutates_args=())
def lora_down(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ weight.T for x [M, K] and weight [R, K], the dropout mask drawn from `seed`,
    summed in fp32 over splits of the columns."""
    from finetune.speed import lora_kernels as k

    m, width = x.shape
    r = weight.shape[0]
    launch = LAUNCH["down"]
    row_blocks = -(-m // launch["BLOCK_M"])
    splits, cols_per_split = _splits(width, launch["BLOCK_K"], row_blocks, x)
    partial = torch.empty(splits, m, r, device=x.device, dtype=torch.float32)
    k.lora_down_kernel[(row_blocks, splits)](x, weight, partial, seed, m, width, cols_per_split, **launch,
                                             **_shared_arguments(p, r, x))
    return partial.sum(0).to(x.dtype)


@lora_down.register_fake
def _(x, weight, seed, p):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("finetune::lora_down_grad_input", mutates_args=())
def lora_down_grad_input(grad_u: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The gradient of lora_down with respect to x: (grad_u @ weight) through the same mask."""
    from finetune.speed import lora_kernels as k

    m, r = grad_u.shape
    width = weight.shape[1]
    grad_x = grad_u.new_empty(m, width)
    launch = LAUNCH["grad_input"]
    k.lora_down_grad_input_kernel[(-(-m // launch["BLOCK_M"]), -(-width // launch["BLOCK_K"]))](
        grad_u, weight, grad_x, seed, m, width, **launch, **_shared_arguments(p, r, grad_u))
    return grad_x


@lora_down_grad_input.register_fake
def _(grad_u, weight, seed, p):
    return grad_u.new_empty(grad_u.shape[0], weight.shape[1])


@torch.library.custom_op("finetune::lora_down_grad_weight", mutates_args=())
def lora_down_grad_weight(grad_u: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The gradient of lora_down with respect to weight: grad_u.T @ dropout(x), in fp32, summed over
    splits of the rows."""
    from finetune.speed import lora_kernels as k

    m, r = grad_u.shape
    width = x.shape[1]
    launch = LAUNCH["grad_weight"]
    column_blocks = -(-width // launch["BLOCK_K"])
    splits, rows_per_split = _splits(m, launch["BLOCK_M"], column_blocks, x)
    partial = torch.empty(splits, r, width, device=x.device, dtype=torch.float32)
    k.lora_down_grad_weight_kernel[(column_blocks, splits)](
        grad_u, x, partial, seed, m, width, rows_per_split, **launch, **_shared_arguments(p, r, x))
    return partial.sum(0)


@lora_down_grad_weight.register_fake
def _(grad_u, x, seed, p):
    return x.new_empty(grad_u.shape[1], x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, seed, p = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.p = p


def _backward(ctx, grad_u):
    x, weight, seed = ctx.saved_tensors
    grad_u = grad_u.contiguous()
    grad_x = lora_down_grad_input(grad_u, weight, seed, ctx.p) if ctx.needs_input_grad[0] else None
    grad_w = lora_down_grad_weight(grad_u, x, seed, ctx.p).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


lora_down.register_autograd(_backward, setup_context=_setup_context)


def fusable(layer: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a linear base (plain, 4-bit or 8-bit) that fused_forward computes in full."""
    from peft.tuners.lora import LoraLayer

    return (isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), torch.nn.Linear)
            and not getattr(layer, "fan_in_fan_out", False))


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA linear layer's forward with the low-rank path in lora_down and one addmm.

    Whatever this does not cover (adapters disabled or merged, mixed adapter batches, DoRA and other
    variants, a bias on lora_B) goes through PEFT's own forward.
    """
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(a in self.lora_variant or self.lora_B[a].bias is not None for a in adapters)):
        return self.finetune_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    out = result.reshape(-1, result.shape[-1])
    autocast = torch.is_autocast_enabled(x.device.type)
    for adapter in adapters:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        # PEFT's dtypes: the autocast dtype under autocast, else the adapter's own, the sum in the result's.
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
        dropout = self.lora_dropout[adapter]
        p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
        seed = (torch.randint(-2**31, 2**31 - 1, (), device=x.device, dtype=torch.int32) if p > 0
                else torch.zeros((), device=x.device, dtype=torch.int32))
        flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        u = lora_down(flat, a.to(dtype), seed, p)
        with torch.autocast(x.device.type, enabled=False):
            if out.dtype == dtype:
                out = torch.addmm(out, u, b.to(dtype).t(), alpha=self.scaling[adapter])
            else:
                out = out + (torch.mm(u, b.to(dtype).t()) * self.scaling[adapter]).to(out.dtype)
    return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every fusable LoRA layer fused_forward; returns how many. PEFT's forward is kept on the
    layer (finetune_peft_forward) for what fused_forward does not cover."""
    fused = 0
    for module in model.modules():
        if fusable(module) and not hasattr(module, "finetune_peft_forward"):
            module.finetune_peft_forward = module.forward
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
    return fused


def kernel_problems(cuda_available: bool) -> list[str]:
    """Why speed.fused_lora cannot run here, if it cannot: it needs Triton and a CUDA GPU (or Triton's
    CPU interpreter, TRITON_INTERPRET=1, which runs the same kernels slowly: for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["speed.fused_lora=true runs Triton kernels but triton is not installed (it comes with CUDA "
                "builds of torch; `pip install triton`), or set speed.fused_lora=false"]
    if not cuda_available and os.environ.get("TRITON_INTERPRET") != "1":
        return ["speed.fused_lora=true runs Triton kernels on a CUDA GPU and none is visible; set "
                "speed.fused_lora=false (on the CPU, TRITON_INTERPRET=1 runs them slowly, for tests)"]
    return []
