"""BLOOM's ALiBi attention through fused kernels (SDPA or FlexAttention) instead of the eager path.

transformers runs BLOOM's attention only eagerly: the ALiBi bias plus QK^T into a batch x heads x
seq x seq tensor, an fp32 softmax, then a bmm, whose elementwise work can cost more than the model's
matmuls (docs/decisions.md). Here the same attention runs as one kernel:

- `flex_attention`: FlexAttention with the bias as a score_mod and the causal/padding mask as a
  block mask, so fully masked blocks are skipped. Compiled (transformers' compile-once wrapper).
- `sdpa`: scaled_dot_product_attention with the bias and mask folded into one additive mask, a
  heads x q x kv tensor in the compute dtype built in each layer (the memory-efficient kernel; flash
  cannot take a bias). No compile needed; also on the CPU.

The bias is the very tensor BLOOM builds (`alibi`, from the padding mask's positions), so padded
and cached batches give what the eager path gives, to rounding. Switching `config._attn_implementation`
makes `BloomModel` build its mask in the format the kernel takes (a BlockMask, or a boolean mask or
None for sdpa), through transformers' own `create_causal_mask`.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

from finetune.config import ConfigError

FUSED_ALIBI_IMPLEMENTATIONS = ("sdpa", "flex_attention")


def fused_alibi_problems(config, implementation: str) -> list[str]:
    """What keeps this BLOOM config from `implementation` (checked before the weights load)."""
    if implementation == "flex_attention" and config.attention_dropout > 0:
        # FlexAttention has no dropout; silently training without it would change the recipe.
        return [f"model.attn_implementation=flex_attention: this BLOOM config has attention_dropout="
                f"{config.attention_dropout}, which FlexAttention cannot apply; use sdpa (or eager)"]
    return []


def use_fused_alibi_attention(model, implementation: str) -> int:
    """Route every BloomAttention of `model` through `implementation`; returns how many were routed."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    if implementation not in FUSED_ALIBI_IMPLEMENTATIONS:
        raise ValueError(f"no fused ALiBi attention named {implementation!r}; use one of {FUSED_ALIBI_IMPLEMENTATIONS}")
    problems = fused_alibi_problems(model.config, implementation)
    if problems:
        raise ConfigError(problems)
    routed = 0
    for module in model.modules():
        if isinstance(module, BloomAttention):
            module.fused_alibi_implementation = implementation
            module.forward = MethodType(_fused_alibi_forward, module)
            routed += 1
    model.config._attn_implementation = implementation
    return routed


def _fused_alibi_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                         output_attentions=False, **kwargs):
    """BloomAttention.forward with the scores, bias, mask, softmax and values in one kernel.

    Returns no attention weights: the kernels never materialize them.
    """
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # each batch x heads x seq x head_dim
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    kv_length = key.shape[2]
    # BLOOM's alibi is (batch * heads) x 1 x kv: slope * key position, one row per sequence and head.
    bias = alibi.view(batch, self.num_heads, kv_length)

    if self.fused_alibi_implementation == "flex_attention":
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        def add_alibi(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, kv_idx]

        context = compile_friendly_flex_attention(
            query, key, value, training=self.training, score_mod=add_alibi, block_mask=attention_mask,
            scale=self.inv_norm_factor,
        )
    else:
        if attention_mask is None:
            # No padding: every sequence has the same bias. transformers leaves the mask out only
            # where SDPA's own is_causal would be right (its sdpa_attention_forward): one query sees
            # every key; several queries start at the first key (no cache, or a static cache's
            # prefill, whose later keys are still empty slots).
            bias = bias[:1]
            attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
            if q_length > 1:
                attention_mask = attention_mask.tril()
        # The dtype's minimum rather than -inf, as transformers masks: a padding query that sees no
        # key then averages values instead of turning NaN (which a 0 label weight would not cancel).
        additive = bias[:, :, None, :].to(query.dtype)
        additive = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=additive, scale=self.inv_norm_factor,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
        )
    context = context.transpose(1, 2).reshape(batch, q_length, self.num_heads * self.head_dim)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None
