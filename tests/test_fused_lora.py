"""LoRA in fused Triton kernels (speed.fused_lora, finetune/speed/fused_lora.py).

On the CPU the real kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Checked against plain torch: the kernels' outputs and gradients, with the dropout mask written out
from the hash's definition in numpy; whole models against PEFT's own layers (no dropout) and against
the same layers with the reference down-projection (dropout); compiled and checkpointed blocks against
eager ones; and the CLI end to end.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.loss import causal_lm_loss_sum
from finetune.speed import fused_lora
from finetune.speed.fused_lora import fuse_lora_layers, kernel_problems, lora_down
from tests.conftest import lora_model, loss_and_grads, run_cli, tiny_run_args
from tests.test_attention import _padded_batch


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def reference_keep(rows: int, columns: int, seed: int, p: float) -> torch.Tensor:
    """The keep mask in unsigned 32-bit numpy arithmetic, from the hash's definition: murmur3's finalizer
    of (row's finalized hash with the seed) xor (column pair x constant), whose low 16 bits decide the
    pair's even column and high 16 bits its odd one, kept at or above p's share of 2**16."""
    columns_ = np.arange(columns, dtype=np.uint32)
    with np.errstate(over="ignore"):
        row_hash = _fmix32(np.arange(rows, dtype=np.uint32)[:, None] * np.uint32(0x9E3779B9)
                           + np.uint32(seed % 2**32))
        h = _fmix32(row_hash ^ ((columns_ >> np.uint32(1)) * np.uint32(0x27D4EB2F)))
    bits = (h >> ((columns_ & np.uint32(1)) * np.uint32(16))) & np.uint32(0xFFFF)
    return torch.from_numpy(bits >= np.uint32(round(fused_lora.mask_probability(p) * 2**16)))


def kept_scale(p: float) -> float:
    """What a kept element is multiplied by: 1 / (1 - p), p as the kernels round it."""
    return 1 / (1 - fused_lora.mask_probability(p))


class ReferenceDown(torch.autograd.Function):
    """lora_down in plain torch with the reference mask."""

    @staticmethod
    def forward(ctx, x, weight, seed, p):
        keep = reference_keep(x.shape[0], x.shape[1], int(seed), p).to(x.device)
        dropped = x.float() * keep * kept_scale(p)
        ctx.save_for_backward(dropped, weight, keep)
        ctx.p = p
        return (dropped @ weight.float().T).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_u):
        dropped, weight, keep = ctx.saved_tensors
        grad_x = (grad_u.float() @ weight.float()) * keep * kept_scale(ctx.p)
        return grad_x.to(grad_u.dtype), (grad_u.float().T @ dropped).to(weight.dtype), None, None


def reference_down(x, weight, seed, p):
    return ReferenceDown.apply(x, weight, seed, p)


@pytest.mark.parametrize("seed", [0, 1, -5, 2**31 - 1, -2**31])
def test_the_kernel_drops_exactly_the_hash_mask(seed):
    """With A the identity (rank = width = 16) and exact fp32 products, u is x * keep / (1 - p)."""
    x = torch.rand(83, 16) + 0.5  # no zeros: u == 0 marks exactly the dropped elements
    u = lora_down(x, torch.eye(16), torch.tensor(seed, dtype=torch.int32), 0.3)
    keep = reference_keep(83, 16, seed, 0.3)
    assert torch.equal(u != 0, keep)
    torch.testing.assert_close(u[keep], x[keep] * kept_scale(0.3))


def test_the_mask_pairs_columns_from_each_tile_start_on_an_odd_width():
    """Columns pair up (2j, 2j + 1) from every tile's start; an odd width ends on a half pair. The input
    gradient is non-zero exactly where the reference mask keeps (A and grad_u have no zero products)."""
    grad_u = torch.rand(40, 16) + 0.5
    weight = torch.rand(16, 301) + 0.5
    grad_x = fused_lora.lora_down_grad_input(grad_u, weight, torch.tensor(99, dtype=torch.int32), 0.3)
    assert torch.equal(grad_x != 0, reference_keep(40, 301, 99, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_input_gradient_kernel_adds_an_addend(dtype):
    """With an addend the kernel writes its term plus the addend, in the input's dtype (speed.fp8_frozen_matmuls
    hands it the frozen matmul's share of the input gradient)."""
    grad_u, weight = torch.randn(150, 16, dtype=dtype), torch.randn(16, 301, dtype=dtype)
    addend = torch.randn(150, 301, dtype=dtype) * 10
    seed = torch.tensor(7, dtype=torch.int32)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    term = fused_lora.lora_down_grad_input(grad_u, weight.float(), seed, 0.3, 0.5)
    exact = reference_keep(150, 301, 7, 0.3) * (grad_u.float() @ weight.float()) * 0.5 * kept_scale(0.3)
    torch.testing.assert_close(term.float(), exact, rtol=rtol, atol=1e-2)
    summed = fused_lora.lora_down_grad_input(grad_u, weight.float(), seed, 0.3, 0.5, addend=addend)
    torch.testing.assert_close(summed.float(), exact + addend.float(), rtol=rtol, atol=1e-2)
    assert summed.dtype == dtype and not torch.equal(summed, addend)
    with pytest.raises(ValueError, match=r"addend of shape \[150, 300\]"):
        fused_lora.lora_down_grad_input(grad_u, weight.float(), seed, 0.3, 0.5, addend=addend[:, :300])


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_hash_mask_has_dropout_statistics(p):
    n = 2048
    dropped = 1 - reference_keep(n, n, 12345, p).double()
    sigma = (p * (1 - p) / n**2) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sigma
    # neighbours along rows and columns and the next seed's mask are independent: both dropped with
    # probability p^2 (five standard deviations of that estimate)
    other = 1 - reference_keep(n, n, 12346, p).double()
    for pair in [dropped[:, 1:] * dropped[:, :-1], dropped[1:] * dropped[:-1], dropped * other]:
        assert abs(pair.mean().item() - p**2) < 5 * (p**2 * (1 - p**2) / pair.numel()) ** 0.5
    assert (dropped.mean(0) - p).abs().max().item() < 6 * (p * (1 - p) / n) ** 0.5  # no column favoured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rank", [8, 16])
def test_the_kernels_give_the_reference_output_and_gradients(dtype, p, rank):
    # shapes that fill no block evenly, on every side
    x = torch.randn(150, 300, dtype=dtype)
    weight = torch.randn(rank, 300, dtype=dtype) * 0.1
    seed = torch.tensor(-12345, dtype=torch.int32)
    grad_u = torch.randn(150, rank, dtype=dtype)
    results = []
    for down in (lora_down, reference_down):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        u = down(xi, wi, seed, p)
        u.backward(grad_u)
        results.append((u, xi.grad, wi.grad))
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype == dtype
        torch.testing.assert_close(got, expected, **tolerance)


def test_both_reductions_add_up_over_several_splits():
    """The down-projection sums over splits of x's columns, the weight gradient over splits of its rows."""
    x, weight, grad_u = torch.randn(256, 1000), torch.randn(16, 1000) * 0.1, torch.randn(256, 16)
    seed = torch.tensor(7, dtype=torch.int32)
    down, grad_weight = fused_lora.LAUNCH["down"], fused_lora.LAUNCH["grad_weight"]
    column_splits, _ = fused_lora._splits(1000, down["BLOCK_K"], -(-256 // down["BLOCK_M"]), x)
    row_splits, _ = fused_lora._splits(256, grad_weight["BLOCK_M"], -(-1000 // grad_weight["BLOCK_K"]), x)
    assert column_splits > 1 and row_splits > 1, (column_splits, row_splits)
    dropped = x * reference_keep(256, 1000, 7, 0.2) * kept_scale(0.2)
    torch.testing.assert_close(fused_lora.lora_down(x, weight, seed, 0.2), dropped @ weight.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_lora.lora_down_grad_weight(grad_u, x, seed, 0.2), grad_u.T @ dropped,
                               rtol=1e-4, atol=1e-4)


def test_the_split_reductions_share_counts_that_each_kernel_leaves_at_zero(monkeypatch):
    """The three kernels with split reductions share one buffer of arrival counts per device, made
    when the layers are fused. Each kernel sets its counts back to 0, so calls after the first (of other
    shapes, several splits each) still add up right from the same buffer, never filled again; a call
    needing more counts than it holds gets its own."""
    monkeypatch.setattr(fused_lora, "_ARRIVAL_COUNTS", {})
    fused_lora.keep_arrival_counts(torch.device("cpu"))
    counts = fused_lora._ARRIVAL_COUNTS[torch.device("cpu")]
    assert fused_lora._arrival_counts(5, counts).data_ptr() == counts.data_ptr()
    assert fused_lora._arrival_counts(fused_lora.ARRIVAL_COUNTS + 1, counts).data_ptr() != counts.data_ptr()
    seed = torch.tensor(3, dtype=torch.int32)
    for m, width in [(256, 1000), (200, 700), (256, 1000)]:
        x, weight, grad_u = torch.randn(m, width), torch.randn(16, width) * 0.1, torch.randn(m, 16)
        grad_out, u = torch.randn(m * 5, width // 2, dtype=torch.bfloat16), torch.randn(m * 5, 16, dtype=torch.bfloat16)
        b = torch.randn(width // 2, 16)
        dropped = x * reference_keep(m, width, 3, 0.2) * kept_scale(0.2)
        results = [fused_lora.lora_down(x, weight, seed, 0.2), fused_lora.lora_down_grad_weight(grad_u, x, seed, 0.2),
                   *fused_lora.lora_up_grads(grad_out, u, b)]
        expected = [dropped @ weight.T, grad_u.T @ dropped,
                    (grad_out.float() @ b.to(torch.bfloat16).float()).to(torch.bfloat16), grad_out.float().T @ u.float()]
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-4)
        assert fused_lora._ARRIVAL_COUNTS[torch.device("cpu")] is counts and not counts.any()


class _TilesTooLarge:
    """Stands in for a Triton kernel whose tiles exceed the GPU's shared memory: launching it raises what
    Triton raises when it loads such a kernel."""

    launches = 0

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kwargs):
            self.launches += 1
            raise OutOfResources(307200, 232448, "shared memory")
        return launch


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("path", ["kernel", "long input", "tiles too large"])
def test_the_up_projection_gradients_equal_two_matmuls(b_dtype, rank, path, monkeypatch):
    """lora_up_grads against grad_out @ B and grad_out.T @ u: in one pass over several row blocks (the
    last one short) and column splits; as two matmuls past UP_GRAD_MAX_ROW_BLOCKS, or where the kernel
    does not fit the GPU (remembered for that device and dtype)."""
    from finetune.speed import lora_kernels

    grad_out, u = torch.randn(1100, 300, dtype=torch.bfloat16), torch.randn(1100, rank, dtype=torch.bfloat16)
    b = torch.randn(300, rank).to(b_dtype)
    row_blocks, col_splits, _ = fused_lora._up_grad_splits(1100, 300, grad_out)
    assert row_blocks > 1 and col_splits > 1, (row_blocks, col_splits)
    monkeypatch.setattr(fused_lora, "_UP_GRADS_DO_NOT_FIT", set())
    if path == "long input":
        monkeypatch.setattr(fused_lora, "UP_GRAD_MAX_ROW_BLOCKS", row_blocks - 1)
    too_large = _TilesTooLarge()
    if path == "tiles too large":
        monkeypatch.setattr(lora_kernels, "lora_up_grads_kernel", too_large)
    for _ in range(2):
        with OpCounter() as calls:
            grad_u, grad_b = fused_lora.lora_up_grads(grad_out, u, b)
        assert calls[torch.ops.aten.mm.default] == (0 if path == "kernel" else 2)
        assert grad_u.dtype == torch.bfloat16 and grad_b.dtype == b_dtype
        # sums in fp32, each result rounded once: to the nearest bf16 of the exact sum, or one unit off it
        expected_u = (grad_out.float() @ b.to(torch.bfloat16).float()).to(torch.bfloat16)
        expected_b = (grad_out.float().T @ u.float()).to(b_dtype)
        for got, expected in [(grad_u, expected_u), (grad_b, expected_b)]:
            torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-5)
    # a kernel that does not fit is tried once per device and dtype, then left alone
    assert fused_lora._UP_GRADS_DO_NOT_FIT == ({(grad_out.device, grad_out.dtype)} if path == "tiles too large" else set())
    assert too_large.launches == (1 if path == "tiles too large" else 0)


class OpCounter(TorchDispatchMode):
    """Counts the ops that run under it, by overload."""

    def __enter__(self):
        self.calls = collections.Counter()
        super().__enter__()
        return self.calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def _quantized_linear(out_features: int, in_features: int, quant_type: str, nested: bool, bias: bool):
    """A real bitsandbytes 4-bit layer (bf16 compute) of random weights, quantized on the CPU."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=nested, quant_type=quant_type)
    weight = torch.randn(out_features, in_features) * 0.05
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested)._quantize("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, dtype=torch.bfloat16) * 0.1, requires_grad=False)
    return layer


@pytest.mark.parametrize("frozen", ["nf4-nested", "nf4", "fp4-nested-bias", "plain"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_the_whole_layer_op_gives_the_frozen_layer_plus_the_adapter(frozen, p, adapter_dtype):
    """lora_linear (the frozen layer and its adapter in one op) against the frozen layer's own forward
    plus the adapter in plain torch with the reference mask: output and the gradients of x, A and B.
    An fp32 adapter (as under autocast) is rounded to bf16 for the products, as PEFT's forward does,
    and gets its gradients in fp32."""
    torch.manual_seed(0)
    if frozen == "plain":
        base = torch.nn.Linear(300, 200, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    else:
        quant_type, *flags = frozen.split("-")
        base = _quantized_linear(200, 300, quant_type, "nested" in flags, "bias" in flags)
    x = torch.randn(150, 300, dtype=torch.bfloat16)
    operands = fused_lora.frozen_operands(base, x, torch.bfloat16)
    assert operands is not None and (operands[3] is not None) == ("nested" in frozen)
    a = (torch.randn(16, 300) * 0.1).to(adapter_dtype)
    b = (torch.randn(200, 16) * 0.1).to(adapter_dtype)
    seed, grad_out = torch.tensor(-777, dtype=torch.int32), torch.randn(150, 200, dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        if fused:
            out, _ = fused_lora.lora_linear(xi, *operands, ai, bi, seed, p, 2.0)
        else:
            low_a, low_b = ai.to(torch.bfloat16), bi.to(torch.bfloat16)
            out = base(xi) + reference_down(xi, low_a, seed, p) @ low_b.T * 2.0
        out.backward(grad_out)
        results.append((out, xi.grad, ai.grad, bi.grad))
    for got, expected, dtype in zip(*results, [torch.bfloat16, torch.bfloat16, adapter_dtype, adapter_dtype]):
        # bf16 sums rounded in other places (the reference rounds the frozen output and each gradient
        # before adding them): a few units in the last place apart elementwise, 0.4% in norm
        assert got.dtype == expected.dtype == dtype
        # an fp32 gradient is summed in fp32 here, the reference's is rounded to bf16 (as PEFT's is under
        # autocast): apart by a few bf16 units of the largest entries
        spread = 1e-2 * expected.abs().max().item() if dtype == torch.float32 else 0.0
        torch.testing.assert_close(got.float(), expected.float(), rtol=5e-2, atol=1e-1 + spread)
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2


def test_frozen_operands_refuse_what_lora_linear_would_compute_differently():
    """Each case falls back to the frozen layer's own forward."""
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    quantized = _quantized_linear(64, 64, "nf4", True, False)
    assert fused_lora.frozen_operands(quantized, x, torch.bfloat16) is not None
    assert fused_lora.frozen_operands(quantized, x, torch.float16) is None  # computes in another dtype
    assert fused_lora.frozen_operands(quantized, x.float(), torch.bfloat16) is None  # input of another dtype
    assert fused_lora.frozen_operands(torch.nn.Linear(64, 64), x, torch.bfloat16) is None  # fp32 weight
    trained_bias = _quantized_linear(64, 64, "nf4", True, True)
    trained_bias.bias.requires_grad_(True)  # lora.bias=all: lora_linear gives the bias no gradient
    assert fused_lora.frozen_operands(trained_bias, x, torch.bfloat16) is None
    hooked = _quantized_linear(64, 64, "nf4", True, False)
    hooked.register_forward_pre_hook(lambda module, args: None)  # e.g. accelerate's offload, which loads weights
    assert fused_lora.frozen_operands(hooked, x, torch.bfloat16) is None
    meta = torch.nn.Linear(64, 64, dtype=torch.bfloat16, device="meta").requires_grad_(False)
    assert fused_lora.frozen_operands(meta, x, torch.bfloat16) is None


def test_the_whole_layer_op_passes_torch_library_checks():
    """Schema, fake implementation, autograd registration and tracing agree with the real op."""
    base = _quantized_linear(48, 64, "nf4", True, True)
    x = torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(8, 64) * 0.1).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(48, 8) * 0.1).to(torch.bfloat16).requires_grad_()
    operands = fused_lora.frozen_operands(base, x, torch.bfloat16)
    torch.library.opcheck(torch.ops.finetune.lora_linear.default,
                          (x, *operands, a, b, torch.tensor(3, dtype=torch.int32), 0.0, 2.0))


def _batch(tokenizer) -> dict:
    return _padded_batch(tokenizer, "right")


def _relative_difference(a: dict, b: dict) -> float:
    x = torch.cat([a[n].float().flatten() for n in b])
    y = torch.cat([b[n].float().flatten() for n in b])
    return ((x - y).norm() / y.norm()).item()


def _loss_without_gradients(model, batch) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return causal_lm_loss_sum(model, batch, 16)


def test_without_dropout_fused_layers_give_peft_loss_and_gradients(tiny_llama, tokenizer):
    model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    model.train()
    batch = _batch(tokenizer)
    peft_loss, peft_grads = loss_and_grads(model, batch, 16, autocast=True)
    with model.disable_adapter():
        peft_base_loss = _loss_without_gradients(model, batch)
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    assert fuse_lora_layers(model) == layers == 7 * model.config.num_hidden_layers
    with OpCounter() as calls:
        fused_loss, fused_grads = loss_and_grads(model, batch, 16, autocast=True)
    # every layer (NF4 base, bf16 compute) runs as one op: none runs bitsandbytes' own 4-bit matmul
    assert calls[torch.ops.finetune.lora_linear_backward.default] == layers
    assert calls[torch.ops.finetune.lora_linear.default] > 0 and calls[torch.ops.bitsandbytes.gemm_4bit.default] == 0
    torch.testing.assert_close(fused_loss, peft_loss, rtol=2e-3, atol=0)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 2 * layers
    assert _relative_difference(fused_grads, peft_grads) < 2e-2
    # with adapters off (a DPO reference pass) PEFT's own forward runs: the base model's loss
    with model.disable_adapter():
        assert torch.equal(_loss_without_gradients(model, batch), peft_base_loss)
    assert abs(peft_base_loss.item() - fused_loss.item()) > 1e-3


def test_with_dropout_fused_layers_give_the_reference_loss_and_gradients(tiny_llama, tokenizer, monkeypatch):
    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "lora.dropout=0.3")
    model.train()
    fuse_lora_layers(model)
    batch = _batch(tokenizer)

    def step(seed: int):
        torch.manual_seed(seed)  # the same seeds for the masks on both sides
        return loss_and_grads(model, batch, 16, autocast=True)

    fused_loss, fused_grads = step(7)
    other_loss, _ = step(8)
    # the reference: each layer's frozen forward, then the adapter through the reference down-projection
    monkeypatch.setattr(fused_lora, "frozen_operands", lambda *args: None)
    monkeypatch.setattr(fused_lora, "lora_down", reference_down)
    reference_loss, reference_grads = step(7)
    torch.testing.assert_close(fused_loss, reference_loss, rtol=2e-3, atol=0)
    assert _relative_difference(fused_grads, reference_grads) < 2e-2
    assert abs(other_loss.item() - fused_loss.item()) > 1e-2  # the masks matter: another draw, another loss
    # evaluation drops nothing: the loss of training mode with p = 0
    monkeypatch.undo()
    model.eval()
    eval_loss = _loss_without_gradients(model, batch)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    torch.testing.assert_close(eval_loss, _loss_without_gradients(model, batch), rtol=1e-3, atol=0)


@pytest.mark.parametrize("kept", [0, 2], ids=["checkpointed", "without-checkpointing"])
def test_compiled_blocks_recompute_the_masks_of_their_forward(tiny_llama, tokenizer, kept, fresh_compile_cache):
    """Compiled blocks (checkpointed, or keeping their matmul outputs) give the eager loss and gradients:
    backward's kernels use the seed the forward drew, whatever is recomputed."""
    from finetune.speed.compile import compile_blocks, keep_activations_of_last_blocks

    model = lora_model(tiny_llama, "speed.fp32_frozen=false", "lora.dropout=0.3")
    model.train()
    fuse_lora_layers(model)
    keep_activations_of_last_blocks(model, kept)
    batch = _batch(tokenizer)

    def step():
        torch.manual_seed(7)
        return loss_and_grads(model, batch, 16, autocast=True)

    eager_loss, eager_grads = step()
    compile_blocks(model)
    # Inductor draws the seeds with torch's own generator here, so both sides see the same masks
    with torch._inductor.config.patch(fallback_random=True):
        compiled_loss, compiled_grads = step()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-3, atol=0)
    assert _relative_difference(compiled_grads, eager_grads) < 2e-2


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-frozen-matmuls"])
def test_the_cli_trains_with_fused_lora(tiny_llama, instruction_file, tmp_path, cache_dir, fp8):
    """With speed.fp8_frozen_matmuls too (finetune/speed/fp8.py): compiled blocks run the FP8 layer op
    (a compiled run pads every batch to data.max_length, 64 here: every call's token count is a
    multiple of 16, which the FP8 path takes)."""
    out = tmp_path / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "speed=fast", "speed.fused_lora=true",
                                   f"speed.fp8_frozen_matmuls={str(fp8).lower()}", "lora.dropout=0.1",
                                   "train.max_steps=6", "train.grad_accum=1", "train.learning_rate=1e-2"), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA in fused Triton kernels" in result.stdout
    assert ("frozen 4-bit matmuls in FP8" in result.stdout) == fp8
    losses = [loss for _, loss in json.loads((out / "summary.json").read_text())["losses"]]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_A" in k for k in f.keys())


def test_preflight_refuses_fused_lora_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problems = kernel_problems(cuda_available=False)
    assert len(problems) == 1 and "CUDA GPU" in problems[0] and "speed.fused_lora=false" in problems[0]
    assert kernel_problems(cuda_available=True) == []
