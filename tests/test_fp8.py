"""The frozen 4-bit matmuls in FP8 (speed.fp8_frozen_matmuls, finetune/speed/fp8.py).

On the CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
and are checked bit for bit against the CPU path (bitsandbytes' dequantization, torch's e4m3 cast),
which the layers run there; the layer op and a whole model against the bf16 path, which FP8 must stay
close to without equalling it (so the FP8 path is the one that ran); the CLI's refusal without
speed.fused_lora (its training run is tests/test_fused_lora.py's CLI test).
"""

from __future__ import annotations

import copy

import pytest
import torch
from bitsandbytes import functional as F

from finetune.speed import fp8, fused_lora
from finetune.speed.dequant_kernels import quant_state_operands
from finetune.speed.fused_lora import fuse_lora_layers
from tests.conftest import lora_model, loss_and_grads, run_cli, tiny_run_args
from tests.test_fused_lora import _quantized_linear, _relative_difference

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_GRID = E4M3_GRID[~E4M3_GRID.isnan()].unique()


def _packed(shape, blocksize, nested, quant_type):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    w[0, :3] = torch.tensor([0.9, -0.7, 0.0])  # one block with a large scale: others sit far below the top
    packed, state = F.quantize_4bit(w.to(torch.bfloat16), blocksize=blocksize, compress_statistics=nested,
                                    quant_type=quant_type)
    return packed, quant_state_operands(state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_the_weight_kernel_equals_the_cpu_path_bit_for_bit(quant_type, nested, blocksize):
    """Shapes: a part tile of rows; columns that are not a multiple of the tile (1152); one block per
    tile row (blocksize 128 with 128 columns)."""
    for shape in [(48, 256), (40, 1152), (33, 128)]:
        packed, (absmax, code, nested_absmax, nested_code, offset, _, bs, nested_bs, state_shape) = \
            _packed(shape, blocksize, nested, quant_type)
        w = fused_lora.frozen_weight(packed, absmax, code, nested_absmax, nested_code, offset, quant_type, bs,
                                     nested_bs, state_shape, torch.float32)
        scale = fp8.weight_scale(w)
        assert scale.shape == (1, max(shape)) and torch.equal(scale, scale[:, :1].expand_as(scale))
        for transposed in (False, True):
            expected = fp8.frozen_weight_e4m3(packed, absmax, code, nested_absmax, nested_code, offset, scale,
                                              quant_type, bs, nested_bs, state_shape, transposed)
            got = fp8.dequantize_4bit_e4m3(packed, absmax, code, nested_absmax, nested_code, offset, scale, bs,
                                           nested_bs, state_shape, transposed)
            assert got.dtype == torch.float8_e4m3fn and got.shape == (shape[::-1] if transposed else shape)
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (shape, transposed)
        # what the e4m3 weight stands for: the weight within e4m3's rounding (1/16 of each value)
        w8 = expected.float().t() if transposed else expected.float()
        assert (w8 * scale[0, 0] - w).abs().max() <= w.abs().max() / 16
        assert w8.abs().max() == 448  # the largest magnitude lands on e4m3's largest


def test_the_row_kernel_equals_the_cpu_path_and_rounds_to_nearest_even(monkeypatch):
    """Rows of very different magnitudes, a row of zeros, rows with a NaN and an inf (scale NaN); a row
    whose scale is 1 holding every e4m3 value and each midpoint between neighbours (ties go to the even
    one). Blocks of 256 columns: each row of 634 is read in three."""
    monkeypatch.setitem(fp8.LAUNCH, "rows", dict(fp8.LAUNCH["rows"], BLOCK=256))
    torch.manual_seed(0)
    grid = E4M3_GRID[E4M3_GRID >= 0]
    midpoints = (grid[1:] + grid[:-1]) / 2
    exact = torch.cat([grid, -grid, midpoints, -midpoints, midpoints + 1e-4, torch.tensor([447.0, -447.0])])
    rows = [exact, torch.randn(exact.numel()) * 1e-3, torch.randn(exact.numel()) * 1e3,
            torch.zeros(exact.numel()), torch.randn(exact.numel()), torch.randn(exact.numel())]
    rows[4][7], rows[5][3] = float("nan"), float("-inf")
    x = torch.stack(rows)
    expected, expected_scale = fp8.rows_to_e4m3(x)
    got, scale = fp8.rows_to_e4m3_by_kernel(x)
    assert got.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.equal(scale[:4], expected_scale[:4]) and scale[0, 0] == 1.0
    assert scale[4:].isnan().all() and expected_scale[4:].isnan().all()
    assert torch.equal(got[:4].view(torch.uint8), expected[:4].view(torch.uint8))
    assert torch.equal(got[0, :2 * grid.numel()].float(), exact[:2 * grid.numel()])  # the grid, unchanged
    # round to nearest even on torch's side too: a midpoint goes to the neighbour with an even mantissa
    tie = got[0, 2 * grid.numel():2 * grid.numel() + midpoints.numel()].view(torch.uint8)
    assert (tie & 1 == 0).all()
    assert (got[3].float() == 0).all() and torch.isfinite(scale[3]).all()
    for row in (1, 2):  # each row within e4m3's rounding, whatever its magnitude
        assert ((got[row].float() * scale[row] - x[row]).abs() <= x[row].abs() / 16 + 1e-12).all()


class CallCounter:
    """Counts the calls of fp8's two matmuls, each still running (the ops' insides are hidden from
    dispatch modes)."""

    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ("frozen_forward", "frozen_input_grad"):
            monkeypatch.setattr(fp8, name, self._counted(name, getattr(fp8, name)))

    def _counted(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


def _layer_results(base, x, a, b, grad_out, fp8_scale):
    operands = list(fused_lora.frozen_operands(base, x, torch.bfloat16))
    operands[6] = fp8_scale
    xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
    out, _ = fused_lora.lora_linear(xi, *operands, ai, bi, torch.tensor(5, dtype=torch.int32), 0.0, 2.0)
    out.backward(grad_out)
    return [out, xi.grad, ai.grad, bi.grad]


@pytest.mark.parametrize("frozen", ["nf4-nested", "fp4-bias"])
def test_the_layer_op_in_fp8_stays_close_to_bf16(frozen, monkeypatch):
    """lora_linear with the weight's FP8 scale against lora_linear without it: output and the gradients
    of x, A and B within e4m3's rounding (a few % in norm), yet not equal; 100 tokens (not a multiple
    of 16) run in bf16, equal to the bf16 op."""
    quant_type, *flags = frozen.split("-")
    base = _quantized_linear(96, 128, quant_type, "nested" in flags, "bias" in flags)
    assert fused_lora.give_fp8_scale(base)
    torch.manual_seed(1)
    a, b = (torch.randn(8, 128) * 0.1).to(torch.bfloat16), (torch.randn(96, 8) * 0.1).to(torch.bfloat16)
    for tokens in (160, 100):
        x = torch.randn(tokens, 128, dtype=torch.bfloat16)
        grad_out = torch.randn(tokens, 96, dtype=torch.bfloat16)
        counter = CallCounter(monkeypatch)
        in_fp8 = _layer_results(base, x, a, b, grad_out, base.finetune_fp8_scale)
        in_bf16 = _layer_results(base, x, a, b, grad_out, None)
        assert counter.calls == ({"frozen_forward": 1, "frozen_input_grad": 1} if tokens % 16 == 0 else {})
        differences = [((got.float() - expected.float()).norm() / expected.float().norm()).item()
                       for got, expected in zip(in_fp8, in_bf16)]
        assert [got.dtype for got in in_fp8] == [expected.dtype for expected in in_bf16]
        if tokens % 16:
            assert differences == [0, 0, 0, 0]
        else:  # the output and x's gradient pass through the frozen matmul; A's and B's do not
            assert all(1e-3 < d < 6e-2 for d in differences[:2]) and differences[2:] == [0, 0], differences


def test_only_4bit_layers_of_fp8_shapes_get_a_scale():
    plain = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    assert not fused_lora.give_fp8_scale(plain) and not hasattr(plain, "finetune_fp8_scale")
    odd = _quantized_linear(72, 96, "nf4", True, False)  # 96 in features: not a multiple of the 64 block
    assert not fused_lora.give_fp8_scale(odd) and not hasattr(odd, "finetune_fp8_scale")
    base = _quantized_linear(64, 64, "nf4", True, False)
    assert fused_lora.give_fp8_scale(base)
    assert "finetune_fp8_scale" not in base.state_dict()  # a buffer that is not saved


def test_the_layer_op_in_fp8_passes_torch_library_checks():
    base = _quantized_linear(48, 64, "nf4", True, True)
    fused_lora.give_fp8_scale(base)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(8, 64) * 0.1).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(48, 8) * 0.1).to(torch.bfloat16).requires_grad_()
    operands = fused_lora.frozen_operands(base, x, torch.bfloat16)
    assert operands[6] is base.finetune_fp8_scale
    torch.library.opcheck(torch.ops.finetune.lora_linear.default,
                          (x, *operands, a, b, torch.tensor(3, dtype=torch.int32), 0.0, 2.0))


def _batch_of_16(tokenizer) -> dict:
    """Two rows padded to 16 tokens: 32 rows of input per layer, a multiple of 16, so FP8 runs."""
    tokenizer = copy.copy(tokenizer)
    enc = tokenizer(["What is the capital of France? Paris.", "The quick brown fox"], return_tensors="pt",
                    padding="max_length", max_length=16, truncation=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def test_a_model_in_fp8_gives_about_the_bf16_loss_and_gradients(tiny_llama, tokenizer, monkeypatch):
    batch = _batch_of_16(tokenizer)
    model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    model.train()
    fuse_lora_layers(model)
    bf16_loss, bf16_grads = loss_and_grads(model, batch, 16, autocast=True)
    fp8_model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    fp8_model.train()
    layers = fuse_lora_layers(fp8_model)
    assert layers == 7 * fp8_model.config.num_hidden_layers
    assert fused_lora.give_fp8_scales(fp8_model) == (layers, layers)
    assert len([m for m in fp8_model.modules() if hasattr(m, "finetune_fp8_scale")]) == layers
    counter = CallCounter(monkeypatch)
    fp8_loss, fp8_grads = loss_and_grads(fp8_model, batch, 16, autocast=True)
    # every block is checkpointed: each forward runs again in backward, in FP8 too
    assert counter.calls == {"frozen_forward": 2 * layers, "frozen_input_grad": layers}
    torch.testing.assert_close(fp8_loss, bf16_loss, rtol=1e-2, atol=0)
    assert fp8_loss != bf16_loss
    assert fp8_grads.keys() == bf16_grads.keys()
    assert 1e-3 < _relative_difference(fp8_grads, bf16_grads) < 5e-2


def test_compiled_blocks_run_the_fp8_layers(tiny_llama, tokenizer, monkeypatch, fresh_compile_cache):
    """Compiled blocks (one checkpointed, one keeping its matmul outputs) call the FP8 matmuls, and give
    eager FP8's loss and gradients."""
    from finetune.speed.compile import compile_blocks, keep_activations_of_last_blocks

    batch = _batch_of_16(tokenizer)
    model = lora_model(tiny_llama, "speed.fp32_frozen=false")
    model.train()
    layers = fuse_lora_layers(model)
    fused_lora.give_fp8_scales(model)
    keep_activations_of_last_blocks(model, 1)
    eager_loss, eager_grads = loss_and_grads(model, batch, 16, autocast=True)
    compile_blocks(model)
    counter = CallCounter(monkeypatch)
    compiled_loss, compiled_grads = loss_and_grads(model, batch, 16, autocast=True)
    # the checkpointed block's 7 layers run forward twice, the other block's once
    assert counter.calls == {"frozen_forward": layers + layers // 2, "frozen_input_grad": layers}
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-3, atol=0)
    # Compiled blocks round their bf16 inputs to the FP8 matmuls a little differently from eager ones
    # (fused norms), and e4m3's step (2**-3 relative) turns that into FP8's own error, not bf16's: the
    # gradients differ by about 2%; a wrong scale or layout would give O(1).
    assert _relative_difference(compiled_grads, eager_grads) < 4e-2


def test_preflight_refuses_fp8_where_it_cannot_run(tmp_path):
    from finetune.preflight import config_problems
    from finetune.run import compose

    def problems(*overrides):
        return config_problems(compose([f"output_dir={tmp_path}", "speed=fast", *overrides]), cuda_available=False,
                               bf16_supported=False)

    fp8_on = ("speed.fused_lora=true", "speed.fp8_frozen_matmuls=true")
    assert problems(*fp8_on) == []
    alone = problems("speed.fp8_frozen_matmuls=true")
    assert len(alone) == 1 and "speed.fused_lora=true" in alone[0]
    int8 = problems(*fp8_on, "quant.mode=int8")
    assert len(int8) == 1 and "quant.mode=nf4" in int8[0]
    fp16 = problems(*fp8_on, "quant.compute_dtype=float16", "train.mixed_precision=no")
    assert len(fp16) == 1 and "quant.compute_dtype=bfloat16" in fp16[0]
    fsdp = problems(*fp8_on, "dist=fsdp")
    assert any("dist.strategy=ddp" in p for p in fsdp)
    # token counts that are not multiples of 16 would quietly run in bf16
    for overrides in [("speed.compile=false",), ("data.max_length=1000",)]:
        width = problems(*fp8_on, *overrides)
        assert len(width) == 1 and "multiple of 16" in width[0], width


def test_the_cli_refuses_fp8_without_fused_lora(tiny_llama, instruction_file, tmp_path, cache_dir):
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, tmp_path / "run", "speed.fp8_frozen_matmuls=true"),
                     cache_dir)
    assert result.returncode == 2 and "speed.fused_lora=true" in result.stderr
