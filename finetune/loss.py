"""Next-token cross-entropy for causal LMs, with a chunked path that never holds the full logits.

The plain path materializes logits of shape tokens x vocab (and an fp32 copy for the loss): for
bloom's 250,880-token vocabulary at 4 x 2048 tokens that is 4 GiB in bf16 plus 8 GiB in fp32, most
of a QLoRA run's peak memory. The chunked path runs the decoder, then the frozen LM head one chunk of
tokens at a time, computing each chunk's loss and its gradient with respect to the hidden states in
the same pass (softmax - one-hot, times the head's weight); backward then only scales that stored
gradient. Same arithmetic as the plain path (bf16 logits under autocast, fp32 log-softmax), so the
loss is equal to rounding; no weight gradient is computed because the head is frozen in LoRA.

Written here rather than taken from Liger-Kernel's fused linear cross-entropy because it must run on
the CPU as well (Liger is Triton-only) and a frozen head needs none of the weight-gradient work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: the autocast dtype if autocast is on, as F.linear would."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_log_probs(h, w, b, y):
    """A chunk's fp32 log-probabilities, labels with ignored rows pointed at 0, the labelled-row mask
    and the summed NLL."""
    valid = y != IGNORE_INDEX
    safe_y = torch.where(valid, y, 0)
    log_probs = torch.log_softmax(F.linear(h, w, b).float(), dim=-1)
    # where, not a product: a non-finite log-probability on an unlabelled (padding) row must add nothing
    total = -torch.where(valid, log_probs.gather(1, safe_y[:, None]).squeeze(1), 0).sum()
    return log_probs, safe_y, valid, total


def _chunk_nll_and_grad(h, w, b, y, with_grad: bool):
    """One chunk's summed NLL and, with `with_grad`, its gradient with respect to `h`.

    `y` holds IGNORE_INDEX on unlabelled rows; such rows add nothing (masked, not skipped: skipping
    an all-unlabelled chunk would need a GPU->CPU sync per chunk to find out). In place where it can
    be, so the eager peak is the fp32 log-probabilities and one more chunk x vocab tensor."""
    log_probs, safe_y, valid, total = _chunk_log_probs(h, w, b, y)
    if not with_grad:
        return total, None
    # d(sum nll)/d logits = softmax - one_hot, on labelled rows only
    grad_logits = log_probs.exp_()
    grad_logits[torch.arange(len(y), device=y.device), safe_y] -= 1
    grad_logits.masked_fill_(~valid[:, None], 0)
    return total, grad_logits.to(w.dtype) @ w


def _fusable_chunk_nll_and_grad(h, w, b, y, with_grad: bool):
    """_chunk_nll_and_grad written for the compiler: no in-place scatter, the one-hot as a comparison
    with the column index, so the cast, log-softmax, gather and gradient fuse into kernels that read
    the chunk's logits and write its gradient without holding fp32 chunk x vocab tensors (eagerly two of
    them, 0.49 GiB each for llama3's vocabulary at 1,024 tokens). Run only compiled: eagerly it holds more."""
    log_probs, safe_y, valid, total = _chunk_log_probs(h, w, b, y)
    if not with_grad:
        return total, None
    is_label = torch.arange(log_probs.shape[-1], device=y.device) == safe_y[:, None]
    grad_logits = torch.where(valid[:, None], log_probs.exp() - is_label.float(), 0)
    return total, grad_logits.to(w.dtype) @ w


# speed.compile. Shapes are marked dynamic on their second variant (the last, shorter chunk).
_compiled_chunk_nll_and_grad = torch.compile(_fusable_chunk_nll_and_grad)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over tokens of `hidden @ weight.T (+ bias)`, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, compiled: bool):
        chunk = _compiled_chunk_nll_and_grad if compiled else _chunk_nll_and_grad
        dtype = _compute_dtype(weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        with_grad = hidden.requires_grad
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if with_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            nll_sum, grad = chunk(hidden[rows].to(dtype), w, b, labels[rows], with_grad)
            total += nll_sum
            if with_grad:
                grad_hidden[rows] = grad
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return (grad_hidden * grad_total).to(ctx.hidden_dtype), None, None, None, None, None


def _decoder_and_head(model):
    """(decoder, lm_head) of a (PEFT-wrapped) HF causal LM, or None where it has another shape."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", ""), None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None  # a trainable head (modules_to_save) needs its weight gradient: plain path
    return decoder, head


def _is_wrapped(model) -> bool:
    """Whether the model is wrapped for several processes (DDP, or FSDP2's root): its own forward must run,
    since it sets up what the backward needs (DDP's gradient reduction, FSDP's gathering of shards)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, (FSDPModule, DistributedDataParallel))


def _hidden_through_root(model, decoder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's output, from a call of the whole (wrapped) model with the head run on one position only.

    Called directly, the decoder would skip the wrapper: under DDP no gradient would be reduced, under
    FSDP the head would stay sharded. After the root's forward FSDP keeps the output head's unit
    gathered until the backward, so its weight can be read.
    """
    captured: dict[str, torch.Tensor] = {}
    handle = decoder.register_forward_hook(lambda module, args, out: captured.update(hidden=out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["hidden"]


def hidden_and_frozen_head(model, inputs: dict[str, torch.Tensor]):
    """(the decoder's output for `inputs`, the frozen output head) for the chunked head paths, or None
    where the model has another shape or a trainable head. A model wrapped for several processes runs
    its own forward (_hidden_through_root), so DDP reduces the gradients and FSDP gathers the head."""
    wrapped = _is_wrapped(model)
    parts = _decoder_and_head(getattr(model, "module", model) if wrapped else model)
    if parts is None:
        return None
    decoder, head = parts
    hidden = _hidden_through_root(model, decoder, inputs) if wrapped else decoder(**inputs).last_hidden_state
    return hidden, head


def supports_chunked_loss(model) -> bool:
    return _decoder_and_head(model) is not None


def batch_on_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """`batch` on `device`, a CUDA batch copied from pinned memory without the host waiting: torch's
    blocking copy waits for the stream, i.e. for everything queued before it (the pinned block is
    kept until the copy is done)."""
    pinned = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pinned and v.device.type == "cpu" else v).to(device, non_blocking=pinned)
            for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets: packed rows pass position ids and no attention mask (transformers then
    builds a block-diagonal causal mask from the restarting positions)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 0,
                       compiled: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled tokens of a batch.

    `chunk_size` > 0 uses the chunked frozen-head path (where the model allows it); 0 the plain one.
    `compiled` (speed.compile) runs each chunk's loss and gradient as one compiled function.
    A batch may carry `position_ids` (packed rows) instead of `attention_mask`.
    """
    inputs = model_inputs(batch)
    labels = batch["labels"][:, 1:]
    parts = hidden_and_frozen_head(model, inputs) if chunk_size > 0 else None
    if parts is None:
        logits = model(**inputs).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    hidden, head = parts
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    return _FrozenHeadCrossEntropy.apply(flat_hidden, head.weight, head.bias, labels.reshape(-1), chunk_size, compiled)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

