"""finetune/speed/dequant_kernels.py on a CUDA GPU: bit for bit bitsandbytes' dequantize_4bit, and how fast.

    python scripts/dequant_check.py            # checks, then both paths' times at llama3-8b shapes
    python scripts/dequant_check.py --sweep    # and the time of each tile setting, best first

Checks: at every llama3-8b shape (NF4, nested absmax, bf16) the kernel's output equals
bitsandbytes.functional.dequantize_4bit's bit for bit, and so on one shape for FP4, no nesting and
fp16/fp32 outputs. Times: one CUDA graph of 10 calls, median of 20 replays (fused_lora_check's _time),
as GB/s of what a dequantization must move: 0.5 B read and 2 B written per element, and the absmax.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
from bitsandbytes import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_lora_check import _time  # noqa: E402

from finetune.speed import dequant_kernels  # noqa: E402
from finetune.speed.dequant_kernels import dequantize_4bit  # noqa: E402

# llama3-8b's projections (out features, in features) and how many of each one decoder block holds
SHAPES = {"q, o": ((4096, 4096), 2), "k, v": ((1024, 4096), 2), "gate, up": ((14336, 4096), 2),
          "down": ((4096, 14336), 1)}
BLOCKSIZE = 64


def quantized(shape, dtype=torch.bfloat16, nested=True, quant_type="nf4"):
    w = torch.randn(*shape, device="cuda", dtype=dtype) * 0.02
    return F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type=quant_type)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal alone takes -0.0 for 0.0)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def check() -> None:
    for name, (shape, _) in SHAPES.items():
        packed, state = quantized(shape)
        assert same_bits(dequantize_4bit(packed, state), F.dequantize_4bit(packed, state)), name
        print(f"check {name} {shape[0]}x{shape[1]} nf4 nested bf16: equal bit for bit")
    for quant_type, nested, dtype in itertools.product(["nf4", "fp4"], [False, True],
                                                       [torch.bfloat16, torch.float16, torch.float32]):
        packed, state = quantized((1024, 4096), dtype, nested, quant_type)
        ours, theirs = dequantize_4bit(packed, state), F.dequantize_4bit(packed, state)
        label = f"check 1024x4096 {quant_type} nested={nested} {str(dtype)[6:]}"
        assert torch.equal(ours, theirs), label
        # FP4's code 0b1000 is 0.0 in QuantState.code, -0.0 in bitsandbytes' CUDA kernel (lut * sign)
        print(f"{label}: equal" + (", bit for bit" if same_bits(ours, theirs) else " (not bit for bit: signs of 0)"))


def weights() -> dict[tuple[int, int], tuple]:
    """Each shape's (packed, quant state, bytes a dequantization moves)."""
    out = {}
    for shape, _ in SHAPES.values():
        packed, state = quantized(shape)
        n = shape[0] * shape[1]
        absmax = state.absmax.numel() * state.absmax.element_size() + state.state2.absmax.numel() * 4
        out[shape] = packed, state, n // 2 + 2 * n + absmax
    return out


def kernel_time(packed, state) -> float:
    return _time(lambda: dequantize_4bit(packed, state))


def bitsandbytes_time(packed, state) -> float:
    """bitsandbytes' path: the nested absmax in one kernel (and an add), then the 4-bit values."""
    return _time(lambda: F.dequantize_4bit(packed, state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time every tile setting over a decoder block")
    args = parser.parse_args()
    import bitsandbytes
    import triton
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "bitsandbytes", bitsandbytes.__version__, "launch", dequant_kernels.LAUNCH)
    check()
    quantized_weights = weights()
    total = {"kernel": 0.0, "bitsandbytes": 0.0}
    for name, (shape, count) in SHAPES.items():
        packed, state, moved = quantized_weights[shape]
        ours, theirs = kernel_time(packed, state), bitsandbytes_time(packed, state)
        total["kernel"] += count * ours
        total["bitsandbytes"] += count * theirs
        print(f"time {name:8s} {shape[0]:5d}x{shape[1]:<5d}: kernel {ours * 1e6:7.1f} us ({moved / ours / 1e9:5.0f} GB/s)"
              f"   bitsandbytes {theirs * 1e6:7.1f} us ({moved / theirs / 1e9:5.0f} GB/s)   x{theirs / ours:.2f}")
    print(f"time llama3-8b block (q, k, v, o, gate, up, down): kernel {total['kernel'] * 1e6:.1f} us"
          f"   bitsandbytes {total['bitsandbytes'] * 1e6:.1f} us   x{total['bitsandbytes'] / total['kernel']:.2f}")
    if not args.sweep:
        return
    chosen = dict(dequant_kernels.LAUNCH)
    results = []
    for tile_bytes, warps in itertools.product([512, 1024, 2048, 4096, 8192], [2, 4, 8, 16]):
        dequant_kernels.LAUNCH.update(TILE_BYTES=tile_bytes, num_warps=warps)
        seconds = sum(count * kernel_time(*quantized_weights[shape][:2]) for shape, count in SHAPES.values())
        results.append((seconds, tile_bytes, warps))
        print(f"sweep TILE_BYTES={tile_bytes:5d} num_warps={warps:2d}: {seconds * 1e6:.1f} us per block")
    dequant_kernels.LAUNCH.update(chosen)
    results.sort()
    print(f"sweep best (us per llama3-8b block; chosen now {chosen}):")
    for seconds, tile_bytes, warps in results[:5]:
        print(f"  TILE_BYTES={tile_bytes} num_warps={warps}: {seconds * 1e6:.1f} us")


if __name__ == "__main__":
    main()
