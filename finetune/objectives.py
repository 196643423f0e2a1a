"""Preference objectives on [chosen; rejected] batches (finetune/preference.py): DPO and ORPO.

DPO (Rafailov et al., 2023) raises the policy's log-probability ratio to a reference model on the
chosen reply over the rejected one. The reference is the same quantized base, never a second copy
in memory: with the adapter switched off when training a fresh adapter, or, when training goes on
from an adapter (SFT first, then DPO), a frozen copy of that adapter loaded beside it as a second
named adapter ("reference") and made active for the reference pass. A LoRA adapter is a small
fraction of the base, so the copy costs little; the reference pass runs under no_grad and in eval
mode (no LoRA dropout), before the policy's forward, so switching adapters never touches a graph
that backward will use.

ORPO (Hong et al., 2024) needs no reference: the NLL of the chosen replies plus lambda times the
log-sigmoid of the log odds ratio of the chosen over the rejected reply, from each reply's mean
per-token log-probability.

Reduction: `preference_loss` returns a micro-batch's share of the step's loss, already divided by
the step's global counts (StepTotals: pairs, and chosen target tokens for ORPO's NLL), so the shares
of every micro-batch on every process add up to the step's mean, as the SFT loop's token sums do.
The formulas and metric names follow TRL's DPOTrainer (loss_type sigmoid / robust) and ORPOTrainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.config import TrainConfig
from finetune.loss import (
    IGNORE_INDEX,
    _chunk_log_probs,
    _compute_dtype,
    causal_lm_loss_sum,
    count_targets,
    hidden_and_frozen_head,
    model_inputs,
)

REFERENCE_ADAPTER = "reference"


@dataclass
class StepTotals:
    """What a step's loss is divided by, summed over its micro-batches (and processes)."""

    pairs: int
    chosen_targets: int  # labelled tokens of the chosen replies: ORPO's NLL is their mean

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(self.pairs + other.pairs, self.chosen_targets + other.chosen_targets)


def count_units(batch: dict[str, torch.Tensor]) -> StepTotals:
    """The pairs and chosen target tokens of one [chosen; rejected] batch."""
    pairs = batch["labels"].shape[0] // 2
    return StepTotals(pairs, int((batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum()))


class _FrozenHeadTokenLogProbs(torch.autograd.Function):
    """Log-probability of each token's label under `hidden @ weight.T (+ bias)`, one chunk of tokens at a
    time (finetune/loss.py's frozen-head path, per token): the full logits are never held.

    A token's log-probability depends on its own hidden state only, so the forward stores each token's
    gradient d logp / d hidden ((one_hot - softmax) @ W) and backward scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        dtype = _compute_dtype(weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        with_grad = hidden.requires_grad
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if with_grad else None
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_probs, safe_y, valid, _ = _chunk_log_probs(hidden[rows].to(dtype), w, b, labels[rows])
            out[rows] = torch.where(valid, log_probs.gather(1, safe_y[:, None]).squeeze(1), 0)
            if with_grad:
                grad_logits = log_probs.exp_().neg_()
                grad_logits[torch.arange(len(safe_y), device=safe_y.device), safe_y] += 1
                grad_logits.masked_fill_(~valid[:, None], 0)
                grad_hidden[rows] = grad_logits.to(w.dtype) @ w
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None
        return (grad_hidden * grad_out[:, None]).to(ctx.hidden_dtype), None, None, None, None


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens (fp32), and its count of them.

    `chunk_size` > 0 (speed.loss_chunk_size) runs the frozen head chunk by chunk where the model allows it.
    """
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    parts = hidden_and_frozen_head(model, model_inputs(batch)) if chunk_size > 0 else None
    if parts is not None:
        hidden, head = parts
        hidden = hidden[:, :-1]
        per_token = _FrozenHeadTokenLogProbs.apply(
            hidden.reshape(-1, hidden.size(-1)), head.weight, head.bias, labels.reshape(-1), chunk_size
        ).view(labels.shape)
        return per_token.sum(-1), valid.sum(-1)
    logits = model(**model_inputs(batch)).logits[:, :-1]
    safe = torch.where(valid, labels, 0)
    # Row by row: the fp32 copy of the logits is then one row's, not the whole batch's.
    rows = []
    for row_logits, row_labels in zip(logits, safe, strict=True):
        row_logits = row_logits.float()
        rows.append(row_logits.gather(-1, row_labels[:, None]).squeeze(-1) - torch.logsumexp(row_logits, dim=-1))
    per_token = torch.stack(rows)
    # where, not a product: a non-finite log-probability on padding must add nothing
    return torch.where(valid, per_token, 0).sum(-1), valid.sum(-1)


def _unwrap(model):
    """The PeftModel inside a DistributedDataParallel wrapper (accelerate.prepare), or the model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def add_reference_copy(model) -> None:
    """Freeze a copy of the active adapter as the reference adapter: DPO that goes on from an SFT adapter
    measures the policy against that adapter, not against the bare base."""
    peft_model = _unwrap(model)
    active = peft_model.active_adapter
    if REFERENCE_ADAPTER in peft_model.peft_config:
        raise ValueError(f"the model has an adapter named {REFERENCE_ADAPTER!r} already")
    peft_model.add_adapter(REFERENCE_ADAPTER, peft_model.peft_config[active])
    params = dict(peft_model.named_parameters())
    copied = 0
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
            param.data.copy_(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{active}.")].data)
            copied += 1
    if not copied:
        raise ValueError(f"no weights of adapter {active!r} were found to copy into the reference adapter")


@contextlib.contextmanager
def reference_model(model) -> Iterator[object]:
    """The reference policy for one no_grad forward: the reference adapter if there is one, else the base."""
    peft_model = _unwrap(model)
    training = peft_model.training
    peft_model.eval()  # no dropout: the reference's log-probabilities are a fixed target
    try:
        if REFERENCE_ADAPTER in peft_model.peft_config:
            active = peft_model.active_adapter
            peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield peft_model
            finally:
                peft_model.set_adapter(active)  # trainable again; the reference stays frozen
        else:
            with peft_model.disable_adapter():
                yield peft_model
    finally:
        peft_model.train(training)


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
               label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO loss from the policy-to-reference log ratios of the chosen and rejected replies.

    sigmoid with label smoothing eps is conservative DPO (cDPO): a cross-entropy against the soft label
    1 - eps; robust is rDPO (Chowdhury et al., 2024), unbiased when a share eps of labels is flipped.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid or robust")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)), odds(y) = p / (1 - p), p the reply's mean per-token probability."""
    return (chosen_mean_logps - rejected_mean_logps) - (_log1mexp(chosen_mean_logps) - _log1mexp(rejected_mean_logps))


def preference_loss(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, totals: StepTotals | None = None,
                    chunk_size: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's share of the step's DPO or ORPO loss, and its share of each metric.

    `totals` are the step's global counts (every micro-batch, every process); None takes this batch's
    own, which makes the loss and the metrics this batch's means. Metrics are detached means over pairs,
    named as TRL logs them (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/...; ORPO also nll_loss, log_odds_ratio, log_odds_chosen). `chunk_size` is speed.loss_chunk_size.
    """
    pairs = batch["labels"].shape[0] // 2
    totals = totals or count_units(batch)
    if cfg.objective == "dpo":
        if cfg.dpo_reference_free:
            ref_logps = torch.zeros(2 * pairs, device=batch["labels"].device)
        else:
            with torch.no_grad(), reference_model(model) as reference:
                ref_logps, _ = sequence_logps(reference, batch, chunk_size)
        logps, _ = sequence_logps(model, batch, chunk_size)
        logratios = logps - ref_logps
        losses = dpo_losses(logratios[:pairs], logratios[pairs:], cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss)
        loss = losses.sum() / totals.pairs
        chosen_rewards, rejected_rewards = (cfg.dpo_beta * logratios.detach()).split(pairs)
        logged_logps, extra = logps, {}
    elif cfg.objective == "orpo":
        logps, n_targets = sequence_logps(model, batch, chunk_size)
        mean_logps = logps / n_targets.clamp(min=1)
        log_odds = orpo_log_odds(mean_logps[:pairs], mean_logps[pairs:])
        ratio = F.logsigmoid(log_odds)
        nll_sum = -logps[:pairs].sum()
        loss = nll_sum / totals.chosen_targets - cfg.orpo_beta * ratio.sum() / totals.pairs
        chosen_rewards, rejected_rewards = (cfg.orpo_beta * mean_logps.detach()).split(pairs)
        logged_logps, extra = mean_logps, {
            "nll_loss": nll_sum.detach() / totals.chosen_targets,
            "log_odds_ratio": ratio.detach().sum() / totals.pairs,
            "log_odds_chosen": log_odds.detach().sum() / totals.pairs,
        }
    else:
        raise ValueError(f"train.objective={cfg.objective!r} is not a preference objective (dpo, orpo)")
    chosen_logps, rejected_logps = logged_logps.detach().split(pairs)
    metrics = {
        "rewards/chosen": chosen_rewards.sum() / totals.pairs,
        "rewards/rejected": rejected_rewards.sum() / totals.pairs,
        "rewards/margins": (chosen_rewards - rejected_rewards).sum() / totals.pairs,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / totals.pairs,
        "logps/chosen": chosen_logps.sum() / totals.pairs,
        "logps/rejected": rejected_logps.sum() / totals.pairs,
        **extra,
    }
    return loss, metrics


class SupervisedObjective:
    """Next-token cross-entropy on the labelled tokens (train.objective=sft): the mean over every target
    token of the step."""

    def units(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """What the step's loss is divided by, for one micro-batch: its target tokens."""
        return [count_targets(batch)]

    def loss(self, model, batch: dict[str, torch.Tensor], units: list[int], speed) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the step's mean loss (units: the step's global counts)."""
        loss_sum = causal_lm_loss_sum(model, batch, speed.loss_chunk_size, speed.compile)
        return loss_sum / max(units[0], 1), {}


class PreferenceObjective:
    """DPO or ORPO on [chosen; rejected] batches: the mean over the step's pairs (and, for ORPO's NLL,
    over its chosen target tokens)."""

    def __init__(self, train: TrainConfig):
        self.train = train

    def units(self, batch: dict[str, torch.Tensor]) -> list[int]:
        totals = count_units(batch)
        return [totals.pairs, totals.chosen_targets]

    def loss(self, model, batch: dict[str, torch.Tensor], units: list[int], speed) -> tuple[torch.Tensor, dict]:
        return preference_loss(model, batch, self.train, StepTotals(*units), speed.loss_chunk_size)


def objective_for(train: TrainConfig) -> SupervisedObjective | PreferenceObjective:
    """The objective train.objective names."""
    return SupervisedObjective() if train.objective == "sft" else PreferenceObjective(train)
