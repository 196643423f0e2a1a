"""SDPA's attention backends on this GPU at a model's attention shape, forward and backward.

    python scripts/attention_backends.py [--batch 2 --heads 32 --kv-heads 8 --seq 2048 --head-dim 128]

Causal attention in bf16, as transformers' SDPA path calls it for a full-length batch (no mask, the
key/value heads shared with enable_gqa, or repeated as repeat_kv does). Prints, per backend, the mean
time of a forward and backward (20 after 3 warm-up), its TFLOP/s, and its largest difference from
the first backend that ran (output and query gradient). "default" is PyTorch's own choice.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}


def forward_backward(q, k, v, grad, backend, gqa: bool) -> torch.Tensor:
    heads, kv_heads = q.shape[1], k.shape[1]
    if not gqa:
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out.backward(grad)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    b, h, kvh, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    flop = 4 * b * h * s * s * d / 2 * 3.5  # causal: half the scores; backward 2.5x the forward
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    reference = None
    for name, backend in BACKENDS.items():
        for gqa in (True, False):
            try:
                out = forward_backward(q, k, v, grad, backend, gqa).detach()
                dq = q.grad.clone()
                reference = reference or (out, dq)
                for _ in range(3):
                    forward_backward(q, k, v, grad, backend, gqa)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    forward_backward(q, k, v, grad, backend, gqa)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 20
                print(f"{name:9s} enable_gqa={gqa!s:5s} {ms:.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  largest difference: "
                      f"output {(out - reference[0]).abs().max().item():.3g}, "
                      f"query gradient {(dq - reference[1]).abs().max().item():.3g}")
            except RuntimeError as e:
                print(f"{name:9s} enable_gqa={gqa!s:5s} cannot run: {str(e).splitlines()[0][:120]}")
            finally:
                q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
