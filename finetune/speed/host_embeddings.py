"""speed.offload_embeddings: the frozen input embedding matrix in pinned CPU memory.

A QLoRA step reads only batch x seq rows of the input embedding matrix, which is frozen and stays
unquantized: vocab x hidden x 2 B on the GPU (0.98 GiB for llama3-8b, as much as a step's
activations with every block checkpointed and offloaded). Here the matrix lives in pinned host
memory; each forward gathers the batch's rows on the CPU and sends only those to the GPU
(batch x seq x hidden x 2 B). The rows are the same numbers, so the loss and gradients are too.

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
    table = emb.weight.detach().to("cpu")
    emb.finetune_device = emb.weight.device
    emb.finetune_table = table.pin_memory() if torch.cuda.is_available() else table
    del emb.weight  # the module's only reference: the GPU copy is freed
    emb.forward = types.MethodType(_gather_on_host, emb)
    return table.numel() * table.element_size()


def _gather_on_host(emb, input_ids: torch.Tensor) -> torch.Tensor:
    table = emb.finetune_table
    ids = input_ids.to("cpu")
    # Gathered straight into pinned memory, so the copy to the GPU is asynchronous.
    rows = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=table.is_pinned())
    torch.index_select(table, 0, ids.reshape(-1), out=rows.view(-1, table.shape[1]))
    return rows.to(emb.finetune_device, non_blocking=True)
