"""speed.offload_embeddings on a CUDA GPU: the batch's rows gathered there from the pinned host matrix
(finetune/speed/host_embeddings.py) against the CPU gather it replaced, for llama3-8b's matrix.

    python scripts/host_embeddings_check.py [--vocab 128256 --hidden 4096 --tokens 4096]

Prints whether the rows are equal bit for bit to the matrix's rows, and per gather (median of 20,
each from ids on the GPU to rows on the GPU, synchronized): the wall time of each path and the GPU
time of the device gather.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from finetune.speed import host_embeddings


class _Model(torch.nn.Module):
    """What offload_embeddings asks of a model: its input embeddings and an untied output head."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False, device="meta")

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def wall_ms(gather, ids) -> float:
    times = []
    for _ in range(23):
        torch.cuda.synchronize()
        start = time.perf_counter()
        gather(ids)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    model = _Model(args.vocab, args.hidden)
    reference = model.embed.weight.detach().clone()
    host_embeddings.offload_embeddings(model)
    emb = model.embed
    if emb.finetune_rows is None:
        raise SystemExit("the pinned matrix is not readable from this GPU: the device gather is not used here")
    ids = torch.randint(0, args.vocab, (2, args.tokens // 2), device="cuda")
    on_device = host_embeddings._gather_on_device(emb, ids)
    on_host = host_embeddings._gather_on_host(emb, ids)
    expected = reference[ids]
    print(f"rows equal bit for bit: device gather {torch.equal(on_device.view(torch.int16), expected.view(torch.int16))}, "
          f"host gather {torch.equal(on_host.view(torch.int16), expected.view(torch.int16))}")
    mib = ids.numel() * args.hidden * 2 / 2**20
    device_ms = wall_ms(lambda i: host_embeddings._gather_on_device(emb, i), ids)
    host_ms = wall_ms(lambda i: host_embeddings._gather_on_host(emb, i), ids)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        host_embeddings._gather_on_device(emb, ids)
    end.record()
    torch.cuda.synchronize()
    kernel_ms = start.elapsed_time(end) / 20
    print(f"{ids.numel()} rows ({mib:.0f} MiB) of a {args.vocab}x{args.hidden} bf16 matrix in pinned host memory:\n"
          f"  device gather: {device_ms:.2f} ms wall, {kernel_ms:.2f} ms on the GPU ({mib / 1024 / kernel_ms * 1e3:.1f} GiB/s)\n"
          f"  host gather and copy: {host_ms:.2f} ms wall")


if __name__ == "__main__":
    main()
