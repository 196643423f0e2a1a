"""speed.fused_lora's kernels on a CUDA GPU: exact against torch, and how fast each one streams its input.

    python scripts/fused_lora_check.py            # checks, then each kernel's time at llama3-8b shapes
    python scripts/fused_lora_check.py --sweep    # and the time of each tile setting, best first
    python scripts/fused_lora_check.py --sweep up_grads   # of one kernel
    python scripts/fused_lora_check.py --p 0      # times without dropout: what the mask's hash costs
    python scripts/fused_lora_check.py --siblings # q/k/v and gate/up: one layer op each, or one for all
    python scripts/fused_lora_check.py --fp8      # each llama3-8b layer in bf16 and with FP8 frozen matmuls

Checks: the dropout mask equals the hash written out in torch integer arithmetic (bit for bit); output,
input gradient and weight gradient match torch's matmuls through that mask; the up-projection's two
gradients (lora_up_grads) match torch's two matmuls. Times: each kernel alone (one CUDA graph of 10
calls, median of 20 replays), as GB/s of the full-width tensor it streams (x, grad_x it writes, or
grad_out), against the same work in torch (dropout's mask applied by torch, then the matmul; for the
up-projection's gradients, the two matmuls the one-op layer ran before).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from finetune.speed import fused_lora
from finetune.speed.fused_lora import (
    UP_GRAD_WAVES,
    WAVES,
    lora_down,
    lora_down_grad_input,
    lora_down_grad_weight,
    lora_up_grads,
)

# llama3-8b's LoRA inputs and outputs, batch 2 x 2048: in features of q/k/v/o/gate/up, down; out features
SHAPES = {"4096 in (q, k, v, o, gate, up)": 4096, "14336 in (down)": 14336}
OUT_SHAPES = {"4096 out (q, o, down)": 4096, "1024 out (k, v)": 1024, "14336 out (gate, up)": 14336}
TOKENS, RANK, P = 4096, 16, 0.05


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    def shift(v, bits):  # logical right shift of int32
        return (v >> bits) & ((1 << (32 - bits)) - 1)
    h = h ^ shift(h, 16)
    h = h * (0x85EBCA6B - 2**32)
    h = h ^ shift(h, 13)
    h = h * (0xC2B2AE35 - 2**32)
    return h ^ shift(h, 16)


def torch_keep(rows: int, columns: int, seed: int, p: float, device) -> torch.Tensor:
    r = torch.arange(rows, device=device, dtype=torch.int32)
    c = torch.arange(columns, device=device, dtype=torch.int32)
    row_hash = _fmix32(r.view(-1, 1) * (0x9E3779B9 - 2**32) + seed)
    h = _fmix32(row_hash ^ ((c >> 1) * 0x27D4EB2F))
    bits = (h >> ((c & 1) * 16)) & 0xFFFF  # a column pair's low 16 bits, then its high 16
    return bits >= round(fused_lora.mask_probability(p) * 2**16)


def check(device) -> None:
    x = torch.rand(1000, 16, device=device) + 0.5
    for seed in [0, 1, -5, 2**31 - 1, -2**31, 123456789]:
        u = lora_down(x, torch.eye(16, device=device), torch.tensor(seed, dtype=torch.int32, device=device), 0.3)
        assert torch.equal(u != 0, torch_keep(1000, 16, seed, 0.3, device)), f"mask differs for seed {seed}"
    print("mask: equal to the hash in torch for 6 seeds (1000 x 16, p 0.3)")
    for width in SHAPES.values():
        x = torch.randn(TOKENS, width, device=device, dtype=torch.bfloat16)
        a = torch.randn(RANK, width, device=device, dtype=torch.bfloat16) * 0.02
        g = torch.randn(TOKENS, RANK, device=device, dtype=torch.bfloat16)
        seed = torch.tensor(2024, dtype=torch.int32, device=device)
        keep = torch_keep(TOKENS, width, 2024, P, device)
        scale = 1 / (1 - fused_lora.mask_probability(P))
        dropped = x.float() * keep * scale
        expect = {"u": dropped @ a.float().T, "grad_x": (g.float() @ a.float()) * keep * scale,
                  "grad_a": g.float().T @ dropped}
        got = {"u": lora_down(x, a, seed, P).float(), "grad_x": lora_down_grad_input(g, a, seed, P).float(),
               "grad_a": lora_down_grad_weight(g, x, seed, P)}
        kept = keep.float().mean().item()
        errors = {k: ((got[k] - expect[k]).norm() / expect[k].norm()).item() for k in expect}
        print(f"width {width}: kept {kept:.5f}; relative error " + ", ".join(f"{k} {e:.2e}" for k, e in errors.items()))
        assert abs(kept - (1 - P)) < 1e-3 and max(errors.values()) < 1e-2
    for width in OUT_SHAPES.values():
        g = torch.randn(TOKENS, width, device=device, dtype=torch.bfloat16)
        u = torch.randn(TOKENS, RANK, device=device, dtype=torch.bfloat16)
        b = torch.randn(width, RANK, device=device) * 0.02
        grad_u, grad_b = lora_up_grads(g, u, b)
        expect_u = torch.mm(g, b.to(torch.bfloat16))
        expect_b = torch.mm(g.t(), u, out_dtype=torch.float32)
        off_u = (grad_u.float() - expect_u.float()).abs().max().item() / expect_u.float().abs().max().item()
        off_b = ((grad_b - expect_b).norm() / expect_b.norm()).item()
        print(f"up-projection gradients, width {width}: grad_u {off_u:.1e} of its largest entry apart from torch's, "
              f"grad_B relative error {off_b:.1e}")
        assert off_u < 2**-7 and off_b < 1e-5


def _time(fn, calls: int = 10) -> float:
    """Median seconds of one fn call, over 20 replays of a CUDA graph of `calls` calls (after warm-up).
    A graph, as in the training step with `speed.cuda_graphs`: timed one launch at a time from Python,
    a kernel of tens of microseconds measures the CPU's launch cost, not the GPU's work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def kernel_times(device, width: int, p: float = P) -> dict[str, float]:
    x = torch.randn(TOKENS, width, device=device, dtype=torch.bfloat16)
    a = torch.randn(RANK, width, device=device, dtype=torch.bfloat16)
    g = torch.randn(TOKENS, RANK, device=device, dtype=torch.bfloat16)
    seed = torch.tensor(7, dtype=torch.int32, device=device)
    return {"down": _time(lambda: lora_down(x, a, seed, p)),
            "grad_input": _time(lambda: lora_down_grad_input(g, a, seed, p)),
            "grad_weight": _time(lambda: lora_down_grad_weight(g, x, seed, p))}


def up_grad_times(device, width: int) -> dict[str, float]:
    """lora_up_grads against the two matmuls it replaces, for an output width."""
    g = torch.randn(TOKENS, width, device=device, dtype=torch.bfloat16)
    u = torch.randn(TOKENS, RANK, device=device, dtype=torch.bfloat16)
    b = torch.randn(width, RANK, device=device)
    return {"up_grads": _time(lambda: lora_up_grads(g, u, b)),
            "torch": _time(lambda: (torch.mm(g, b.to(torch.bfloat16)), torch.mm(g.t(), u, out_dtype=torch.float32)))}


def torch_times(device, width: int, p: float = P) -> dict[str, float]:
    """The same three products in torch, dropout by torch (as PEFT's layers do it, uncompiled)."""
    x = torch.randn(TOKENS, width, device=device, dtype=torch.bfloat16)
    a = torch.randn(RANK, width, device=device, dtype=torch.bfloat16)
    g = torch.randn(TOKENS, RANK, device=device, dtype=torch.bfloat16)
    drop = torch.nn.functional.dropout
    return {"down": _time(lambda: drop(x, p) @ a.T), "grad_input": _time(lambda: drop(g @ a, p)),
            "grad_weight": _time(lambda: g.T @ drop(x, p))}


def _nf4(rows: int, columns: int, device, fp8_scale: bool = False) -> tuple:
    """lora_linear's frozen operands of a random NF4 weight with nested absmax, with its FP8 scale
    (speed.fp8_frozen_matmuls) or without."""
    import bitsandbytes as bnb

    from finetune.speed import fp8
    from finetune.speed.dequant_kernels import quant_state_operands

    weight = bnb.nn.Params4bit(torch.randn(rows, columns) * 0.02, requires_grad=False, quant_type="nf4",
                               compress_statistics=True).to(device)
    absmax, code, nested_absmax, nested_code, offset, *settings = quant_state_operands(weight.quant_state)
    scale = fp8.weight_scale(fused_lora.frozen_weight(weight, absmax, code, nested_absmax, nested_code, offset,
                                                      *settings, torch.float32)) if fp8_scale else None
    return weight, absmax, code, nested_absmax, nested_code, offset, scale, *settings, None


def sibling_times(device, widths: list[int], hidden: int = 4096) -> tuple[float, float]:
    """Seconds of forward and backward of sibling layers that read one input (llama3-8b's q/k/v or
    gate/up, NF4): each layer its own lora_linear, against one lora_linear for all of them, their 4-bit
    weights quantized as one matrix, the adapters' A stacked and B block-diagonal, one dropout mask (the
    idea of 053a93b, reverted: docs/decisions.md). In CUDA graphs (_time): no launch cost is counted."""
    from finetune.speed.fused_lora import keep_arrival_counts, lora_linear

    keep_arrival_counts(device)
    x = torch.randn(TOKENS, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    seed = torch.zeros((), device=device, dtype=torch.int32)
    alone, stacked = [_nf4(w, hidden, device) for w in widths], _nf4(sum(widths), hidden, device)
    a = [(torch.randn(RANK, hidden, device=device) * 0.02).requires_grad_() for _ in widths]
    b = [(torch.randn(w, RANK, device=device) * 0.02).requires_grad_() for w in widths]
    grads = [torch.randn(TOKENS, w, device=device, dtype=torch.bfloat16) for w in widths]
    stacked_grad = torch.cat(grads, 1)

    def one_op_each():
        outs = [lora_linear(x, *frozen, ai, bi, seed, P, 2.0)[0] for frozen, ai, bi in zip(alone, a, b)]
        torch.autograd.backward(outs, grads)

    def one_op():
        lora_linear(x, *stacked, torch.cat(a), torch.block_diag(*b), seed, P, 2.0)[0].backward(stacked_grad)

    return _time(one_op_each, calls=5), _time(one_op, calls=5)


# llama3-8b's frozen layers, [out, in]
LAYERS = {"q, o": (4096, 4096), "k, v": (1024, 4096), "gate, up": (14336, 4096), "down": (4096, 14336)}


def fp8_layer(device, out_features: int, in_features: int) -> dict[str, float]:
    """One llama3-8b layer (NF4, rank 16) by lora_linear in bf16 and with its frozen matmuls in FP8
    (speed.fp8_frozen_matmuls): seconds of forward and backward each, and the output's and x's gradient's
    error against the same layer in fp32 (norm of the difference / norm)."""
    from finetune.speed.fused_lora import keep_arrival_counts, lora_linear

    keep_arrival_counts(device)
    frozen = _nf4(out_features, in_features, device, fp8_scale=True)
    scale = frozen[6]
    x = torch.randn(TOKENS, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(RANK, in_features, device=device) * 0.02).requires_grad_()
    b = (torch.randn(out_features, RANK, device=device) * 0.02).requires_grad_()
    grad = torch.randn(TOKENS, out_features, device=device, dtype=torch.bfloat16)
    seed = torch.zeros((), device=device, dtype=torch.int32)
    w = fused_lora.frozen_weight(*frozen[:6], *frozen[7:11], torch.float32)
    exact_x = x.detach().float().requires_grad_()
    exact = exact_x @ w.t() + (exact_x @ a.detach().t() @ b.detach().t()) * 2.0
    exact.backward(grad.float())
    result = {}
    for name, fp8_scale in [("bf16", None), ("fp8", scale)]:
        operands = (*frozen[:6], fp8_scale, *frozen[7:])
        x.grad = None
        out = lora_linear(x, *operands, a, b, seed, 0.0, 2.0)[0]
        out.backward(grad)
        result[f"{name} out error"] = ((out.float() - exact).norm() / exact.norm()).item()
        result[f"{name} grad error"] = ((x.grad.float() - exact_x.grad).norm() / exact_x.grad.norm()).item()
        # fresh leaves: a graph cannot capture gradients accumulated into ones made outside it
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
        result[f"{name} ms"] = _time(lambda ops=operands, xt=leaves[0], at=leaves[1], bt=leaves[2]: lora_linear(
            xt, *ops, at, bt, seed, 0.0, 2.0)[0].backward(grad), calls=5) * 1e3
    return result


def fp8_kernel_check(device) -> None:
    """The FP8 kernels on this GPU against torch's cast of the same numbers, and their rates."""
    from finetune.speed import fp8

    frozen = _nf4(14336, 4096, device, fp8_scale=True)
    w = fused_lora.frozen_weight(*frozen[:6], *frozen[7:11], torch.float32)
    expected = (w * (1.0 / frozen[6][0, 0])).clamp(-448, 448).to(torch.float8_e4m3fn)
    x = torch.randn(TOKENS, 14336, device=device, dtype=torch.bfloat16)
    # divided by a tensor: torch on a GPU divides by a Python number as a * fl(1 / b), which is an ulp off
    # the IEEE quotient the kernel computes for some rows (docs/decisions.md)
    x_scale = x.float().abs().amax(1, keepdim=True) / torch.full((), 448.0, device=device)
    expected_x = (x.float() * (1.0 / x_scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    got_x, got_scale = fp8.rows_to_e4m3_by_kernel(x)
    print(f"rows_to_e4m3 [4096, 14336]: {(got_x.view(torch.uint8) != expected_x.view(torch.uint8)).sum().item()} "
          f"of {x.numel():,} differ from torch's cast, scales equal: {torch.equal(got_scale, x_scale)}; "
          f"{_time(lambda: fp8.rows_to_e4m3_by_kernel(x)) * 1e6:.1f} us")
    args = (*frozen[:6], frozen[6], frozen[8], frozen[9], frozen[10])
    for transposed in (False, True):
        got = fp8.dequantize_4bit_e4m3(*args, transposed=transposed)
        want = expected.t() if transposed else expected
        seconds = _time(lambda t=transposed: fp8.dequantize_4bit_e4m3(*args, transposed=t))
        print(f"dequantize_4bit_e4m3 [14336, 4096]{' transposed' if transposed else ''}: "
              f"{(got.view(torch.uint8) != want.view(torch.uint8)).sum().item()} of {w.numel():,} differ; "
              f"{seconds * 1e6:.1f} us ({w.numel() * 1.5 / seconds / 1e9:.0f} GB/s read and written)")
    bf16 = _time(lambda: fused_lora.frozen_weight(*frozen[:6], *frozen[7:11], torch.bfloat16))
    print(f"the bf16 dequantization of the same weight: {bf16 * 1e6:.1f} us; a transposed copy of the e4m3 "
          f"weight in torch: {_time(lambda: expected.t().contiguous()) * 1e6:.1f} us")
    # the matmuls alone, gate/up's shape: what FP8 buys before the conversions around it
    w16, x16 = w.to(torch.bfloat16), torch.randn(TOKENS, 4096, device=device, dtype=torch.bfloat16)
    x8, x8_scale = fp8.rows_to_e4m3(x16)
    w_scale = frozen[6][:, :w.shape[0]]
    flops = 2 * TOKENS * w.shape[0] * w.shape[1]
    for name, fn in [("bf16 mm", lambda: torch.mm(x16, w16.t())),
                     ("fp8 scaled_mm", lambda: torch._scaled_mm(x8, expected.t(), x8_scale, w_scale,
                                                                out_dtype=torch.bfloat16)),
                     ("fp8 scaled_mm, fast accumulation", lambda: torch._scaled_mm(
                         x8, expected.t(), x8_scale, w_scale, out_dtype=torch.bfloat16, use_fast_accum=True))]:
        seconds = _time(fn)
        print(f"[{TOKENS}, 4096] x [4096, 14336] {name}: {seconds * 1e6:.1f} us ({flops / seconds / 1e12:.0f} TFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", nargs="*", metavar="KERNEL",
                        help="time every tile setting of each kernel named (down, grad_input, grad_weight, "
                             "up_grads; none named: all)")
    parser.add_argument("--p", type=float, default=P, help=f"the dropout probability timed (default {P})")
    parser.add_argument("--siblings", action="store_true",
                        help="only time q/k/v and gate/up as one op per layer against one op for all")
    parser.add_argument("--fp8", action="store_true",
                        help="only time and check each llama3-8b layer with and without FP8 frozen matmuls")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if args.siblings:
        for name, widths in {"q/k/v": [4096, 1024, 1024], "gate/up": [14336, 14336]}.items():
            each, together = sibling_times(device, widths)
            print(f"{name}, forward and backward: one op per layer {each * 1e3:.3f} ms, one op for the "
                  f"siblings {together * 1e3:.3f} ms")
        return
    if args.fp8:
        fp8_kernel_check(device)
        total = {"bf16": 0.0, "fp8": 0.0}
        for name, (out_features, in_features) in LAYERS.items():
            r = fp8_layer(device, out_features, in_features)
            count = 2 if "," in name else 1
            total["bf16"] += count * r["bf16 ms"]
            total["fp8"] += count * r["fp8 ms"]
            print(f"{name} [{out_features}, {in_features}], forward and backward: bf16 {r['bf16 ms']:.3f} ms, "
                  f"fp8 {r['fp8 ms']:.3f} ms; error against fp32, output {r['bf16 out error']:.2e} (bf16) "
                  f"{r['fp8 out error']:.2e} (fp8), x's gradient {r['bf16 grad error']:.2e} {r['fp8 grad error']:.2e}")
        print(f"one llama3-8b block's seven layers: bf16 {total['bf16']:.3f} ms, fp8 {total['fp8']:.3f} ms "
              f"({total['bf16'] / total['fp8']:.2f}x)")
        return
    check(device)
    bytes_per = {w: TOKENS * w * 2 for w in SHAPES.values()}
    for name, width in SHAPES.items():
        ours, plain = kernel_times(device, width, args.p), torch_times(device, width, args.p)
        for kernel in ours:
            print(f"{name}: {kernel:12s} {ours[kernel] * 1e6:7.1f} us ({bytes_per[width] / ours[kernel] / 1e9:6.0f} GB/s)"
                  f"   torch {plain[kernel] * 1e6:7.1f} us")
    for name, width in OUT_SHAPES.items():
        times = up_grad_times(device, width)
        print(f"{name}: up_grads     {times['up_grads'] * 1e6:7.1f} us ({TOKENS * width * 2 / times['up_grads'] / 1e9:6.0f} GB/s)"
              f"   torch {times['torch'] * 1e6:7.1f} us")
    if args.sweep is None:
        return
    swept = args.sweep or list(fused_lora.LAUNCH)
    if "up_grads" in swept:
        sweep_up_grads(device)
    chosen = {k: dict(v) for k, v in fused_lora.LAUNCH.items() if k != "up_grads"}
    for kernel in [k for k in chosen if k in swept]:
        results = []
        for block_m, block_k, warps, stages in itertools.product([16, 32, 64, 128], [64, 128, 256], [4, 8], [1, 3]):
            fused_lora.LAUNCH[kernel] = dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
            try:
                total = sum(kernel_times(device, w, args.p)[kernel] for w in SHAPES.values())
            except Exception as e:  # a tile too large for shared memory
                print(f"  {kernel} {block_m}x{block_k} w{warps}: {type(e).__name__}")
                continue
            results.append((total, block_m, block_k, warps, stages))
        results.sort()
        print(f"{kernel}: best tile settings (total us over the two widths; chosen now {chosen[kernel]})")
        for total, block_m, block_k, warps, stages in results[:6]:
            print(f"  BLOCK_M={block_m} BLOCK_K={block_k} num_warps={warps} num_stages={stages}: {total * 1e6:.1f} us")
        if kernel != "grad_input":  # the two reductions: how much their split buys, at the best tiles
            fused_lora.LAUNCH[kernel] = dict(zip(("BLOCK_M", "BLOCK_K", "num_warps", "num_stages"), results[0][1:]))
            for waves in [0, 1, 2, 4, 8]:  # 0: no split
                fused_lora.WAVES = waves
                total = sum(kernel_times(device, w, args.p)[kernel] for w in SHAPES.values())
                print(f"  at the best tiles, WAVES={waves}: {total * 1e6:.1f} us")
            fused_lora.WAVES = WAVES
        fused_lora.LAUNCH[kernel] = chosen[kernel]


def sweep_up_grads(device) -> None:
    """Time lora_up_grads at each tile setting over the three output widths, and print the best."""
    chosen, results = dict(fused_lora.LAUNCH["up_grads"]), []
    for block_m, block_n, warps, stages, waves in itertools.product([256, 512, 1024], [32, 64, 128], [4, 8],
                                                                      [2, 3, 4], [1]):
        fused_lora.LAUNCH["up_grads"] = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        fused_lora.UP_GRAD_WAVES = waves
        try:
            total = sum(up_grad_times(device, w)["up_grads"] for w in OUT_SHAPES.values())
        except Exception as e:  # a tile too large for shared memory or registers
            print(f"  up_grads {block_m}x{block_n} w{warps} s{stages}: {type(e).__name__}")
            continue
        results.append((total, block_m, block_n, warps, stages, waves))
        print(f"  BLOCK_M={block_m} BLOCK_N={block_n} num_warps={warps} num_stages={stages} UP_GRAD_WAVES={waves}: "
              f"{total * 1e6:.1f} us", flush=True)
    fused_lora.LAUNCH["up_grads"], fused_lora.UP_GRAD_WAVES = chosen, UP_GRAD_WAVES
    results.sort()
    print(f"up_grads: best settings (total us over the three widths; chosen now {chosen}, "
          f"UP_GRAD_WAVES={UP_GRAD_WAVES})")
    for total, block_m, block_n, warps, stages, waves in results[:8]:
        print(f"  BLOCK_M={block_m} BLOCK_N={block_n} num_warps={warps} num_stages={stages} "
              f"UP_GRAD_WAVES={waves}: {total * 1e6:.1f} us")


if __name__ == "__main__":
    main()
