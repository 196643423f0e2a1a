"""speed.offload_embeddings: the frozen input embedding matrix in pinned CPU memory.

A QLoRA step reads only batch x seq rows of the input embedding matrix, which is frozen and stays
unquantized: vocab x hidden x 2 B on the GPU (0.98 GiB for llama3-8b, as much as a step's
activations with every block checkpointed and offloaded). Here the matrix lives in pinned host
memory. On a CUDA GPU each forward gathers the batch's rows there, reading the pinned matrix in place
over the bus (CUDA's unified addressing: a kernel may read pinned host memory through its own
pointer), so only batch x seq x hidden x 2 B cross and the host never waits for the GPU; elsewhere the
rows are gathered on the CPU and copied. The rows are the same numbers, so the loss and gradients are
too.

Why not gather on the CPU for a CUDA step too: the ids are on the GPU by then, so reading them waits
for the GPU to drain, and the GPU then idles while the CPU gathers and copies; the gather on the GPU
takes about half that time (scripts/host_embeddings_check.py, docs/decisions.md).

The matrix leaves the module's parameters (it is frozen; nothing optimizes or saves it), so whatever
asks the model for its device or checks that its parameters share one (transformers' generate, DDP)
still sees the GPU. The output head must be a matrix of its own: a tied head reads all of it each step.
"""

from __future__ import annotations

import types

import torch


def offload_problems(model, trained: list[str] = ()) -> list[str]:
    """Why the model's input embeddings cannot move to host memory (empty: they can). `trained`: the
    module names LoRA adapts or trains whole (lora.target_modules + lora.modules_to_save)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), "")
    if name and any(t == name or t == name.rsplit(".", 1)[-1] for t in trained):
        return [f"speed.offload_embeddings keeps the input embeddings ({name}) frozen in host memory, but the LoRA "
                "settings train them (lora.target_modules or lora.modules_to_save): remove them there or set "
                "speed.offload_embeddings=false"]
    if type(emb) is not torch.nn.Embedding or emb.max_norm is not None:
        # Subclasses (e.g. gemma's scaled embeddings) and max_norm (rows renormalised on lookup) compute
        # more than the plain gather this replaces.
        what = type(emb).__name__ if type(emb) is not torch.nn.Embedding else "torch.nn.Embedding with max_norm"
        return [f"speed.offload_embeddings gathers rows of a plain torch.nn.Embedding; this model's input embeddings "
                f"are a {what}: set speed.offload_embeddings=false"]
    if head is not None and head.weight is emb.weight:
        return ["speed.offload_embeddings: this model's output head shares the input embedding matrix "
                "(tie_word_embeddings), which every step reads whole on the GPU: set speed.offload_embeddings=false"]
    return []


def offload_embeddings(model) -> int:
    """Move the frozen input embedding matrix to pinned CPU memory; returns its bytes."""
    problems = offload_problems(model)
    if problems:
        raise ValueError(problems[0])
    emb = model.get_input_embeddings()
    if emb.weight.is_meta or hasattr(emb, "_hf_hook"):
        raise ValueError("speed.offload_embeddings moves the input embeddings itself, but accelerate placed them "
                         "(quant.device_map or quant.max_memory): remove those or set speed.offload_embeddings=false")
    if emb.weight.requires_grad:
        raise ValueError("speed.offload_embeddings keeps the input embeddings frozen in host memory, but they are "
                         "trained (lora.target_modules or lora.modules_to_save name them): remove them there or set "
                         "speed.offload_embeddings=false")
    table = emb.weight.detach().to("cpu").contiguous()
    emb.finetune_device = emb.weight.device
    emb.finetune_table = table.pin_memory() if torch.cuda.is_available() else table
    del emb.weight  # the module's only reference: the GPU copy is freed
    emb.finetune_rows = _device_rows(emb.finetune_table, emb.finetune_device)
    emb.forward = types.MethodType(_gather_on_host if emb.finetune_rows is None else _gather_on_device, emb)
    return table.numel() * table.element_size()


def _device_rows(table: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A tensor on `device` over the pinned table's own host memory, each row as whole 8-, 4-, 2- or
    1-byte words (a wider load per thread reads the bus better), or None where kernels there cannot
    read it: not a CUDA device, memory not pinned, or pinned for another device. The view holds the
    table: its memory cannot go back to the pinned-memory cache while the view exists."""
    if device.type != "cuda" or not table.is_pinned():
        return None
    row_bytes = table.shape[1] * table.element_size()
    word = next(w for w in (torch.int64, torch.int32, torch.int16, torch.int8) if row_bytes % w.itemsize == 0)
    words = table.view(word)
    interface = types.SimpleNamespace(__cuda_array_interface__={
        "shape": tuple(words.shape), "typestr": f"<i{word.itemsize}", "data": (words.data_ptr(), False),
        "version": 2, "strides": None}, owner=table)
    rows = torch.as_tensor(interface)  # a view, no copy: torch reads the pointer's device from CUDA
    return rows if rows.device == device and rows.data_ptr() == table.data_ptr() else None


def _gather_on_device(emb, input_ids: torch.Tensor) -> torch.Tensor:
    table = emb.finetune_table
    words = torch.index_select(emb.finetune_rows, 0, input_ids.to(emb.finetune_device).reshape(-1))
    return words.view(table.dtype).view(*input_ids.shape, table.shape[1])


def _gather_on_host(emb, input_ids: torch.Tensor) -> torch.Tensor:
    table = emb.finetune_table
    ids = input_ids.to("cpu")
    # Gathered straight into pinned memory, so the copy to the GPU is asynchronous.
    rows = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=table.is_pinned())
    torch.index_select(table, 0, ids.reshape(-1), out=rows.view(-1, table.shape[1]))
    return rows.to(emb.finetune_device, non_blocking=True)
