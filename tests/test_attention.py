"""Speed settings that must not change the arithmetic: BLOOM's fused ALiBi attention, and blocks
that keep their activations instead of being checkpointed. Each against the plain path, on the real
NF4 base with LoRA adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.config import ConfigError
from finetune.preflight import config_problems, model_problems
from finetune.run import compose
from finetune.speed.alibi import use_fused_alibi_attention
from tests.conftest import lora_model, loss_and_grads


def _model(model_dir, *overrides):
    return lora_model(model_dir, "quant.compute_dtype=float32", *overrides)


def _padded_batch(tokenizer, side: str):
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = side
    enc = tokenizer(["What is the capital of France? Paris.", "The quick brown fox"], return_tensors="pt",
                    padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    if side == "left":
        # Nothing predicts a row's first token from its padding: the queries of left padding see no
        # key, and what a kernel does with such a row (eager: uniform over every key) is arbitrary.
        labels[torch.arange(len(labels)), enc["attention_mask"].argmax(1)] = -100
    return {**enc, "labels": labels}


@pytest.mark.parametrize("side", ["right", "left"])
def test_sdpa_alibi_gives_the_eager_loss_and_gradients(tiny_bloom, tokenizer, side):
    batch = _padded_batch(tokenizer, side)
    eager_loss, eager_grads = loss_and_grads(_model(tiny_bloom, "model.attn_implementation=eager"), batch)
    fused = _model(tiny_bloom, "model.attn_implementation=sdpa")
    assert fused.config._attn_implementation == "sdpa"
    fused_loss, fused_grads = loss_and_grads(fused, batch)
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert eager_grads.keys() == fused_grads.keys() and len(eager_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(fused_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bloom_trains_with_the_fused_sdpa_attention_by_default(tiny_bloom):
    model = _model(tiny_bloom)
    assert model.config._attn_implementation == "sdpa"
    blocks = [m for m in model.modules() if type(m).__name__ == "BloomAttention"]
    assert blocks and all(m.fused_alibi_implementation == "sdpa" for m in blocks)


@pytest.mark.parametrize("cache, left_padding", [("dynamic", True), ("static", False)])
def test_sdpa_alibi_generates_what_eager_generates(cache, left_padding):
    # Weights large enough for attention to decide the tokens: at the usual 0.02 init, greedy tokens
    # of a random model barely depend on it. The scores of every step are compared, not only tokens.
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    fused = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    fused.load_state_dict(eager.state_dict())
    use_fused_alibi_attention(fused, "sdpa")
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(ids)
    if left_padding:
        mask[1, :3] = 0
    outputs = []
    for model in (eager, fused):
        with torch.no_grad():  # a KV cache: queries of length 1 against every earlier key
            outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          pad_token_id=0, cache_implementation=cache, output_scores=True,
                                          return_dict_in_generate=True))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(torch.stack(outputs[1].scores), torch.stack(outputs[0].scores), rtol=1e-4, atol=1e-4)


def test_flex_alibi_gives_the_eager_logits():
    # The CPU has no FlexAttention backward (training falls back to sdpa, tested below), so the
    # kernel's forward is compared here, with padding on both sides.
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    flex = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    flex.load_state_dict(eager.state_dict())
    assert use_fused_alibi_attention(flex, "flex_attention") == 2
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        expected, got = eager(input_ids=ids, attention_mask=mask).logits, flex(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)


def test_flex_attention_falls_back_to_sdpa_on_the_cpu(tiny_bloom, capsys):
    model = _model(tiny_bloom, "model.attn_implementation=flex_attention")
    assert model.config._attn_implementation == "sdpa"
    assert "using sdpa" in capsys.readouterr().out


def test_flex_alibi_refuses_attention_dropout():
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4, attention_dropout=0.1)
    with pytest.raises(ConfigError, match="attention_dropout=0.1"):
        use_fused_alibi_attention(AutoModelForCausalLM.from_config(config), "flex_attention")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bloom"])
def test_blocks_without_checkpointing_give_the_checkpointed_loss_and_gradients(arch, request, tokenizer):
    model_dir = request.getfixturevalue(arch)
    batch = _padded_batch(tokenizer, "right")
    every = _model(model_dir, "train.gradient_checkpointing=true")
    some = _model(model_dir, "train.gradient_checkpointing=true", "speed.blocks_without_checkpointing=1")
    flags = [b.gradient_checkpointing for b in some.base_model.model.modules() if hasattr(b, "self_attn")
             or hasattr(b, "self_attention")]
    assert flags == [True, False]  # the last block keeps its activations
    every_loss, every_grads = loss_and_grads(every, batch)
    some_loss, some_grads = loss_and_grads(some, batch)
    torch.testing.assert_close(some_loss, every_loss, rtol=0, atol=0)
    for name in every_grads:
        torch.testing.assert_close(some_grads[name], every_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_more_blocks_without_checkpointing_than_the_model_has_is_refused(tiny_llama):
    # Counted on the weightless copy, before any weight loads.
    cfg = compose([f"model.name_or_path={tiny_llama}", "output_dir=/tmp/unused", "speed.blocks_without_checkpointing=5"])
    problems = model_problems(cfg, str(tiny_llama), cuda_available=False)
    assert any("blocks_without_checkpointing=5 but the model has 2" in p for p in problems), problems


def test_blocks_without_checkpointing_needs_checkpointing():
    cfg = compose(["output_dir=/tmp/unused", "train.gradient_checkpointing=false", "speed.blocks_without_checkpointing=2"])
    problems = config_problems(cfg, cuda_available=False, bf16_supported=False)
    assert any("blocks_without_checkpointing=2 has no effect" in p for p in problems)


def test_cuda_graphs_need_compiled_blocks_and_no_accumulation():
    cfg = compose(["output_dir=/tmp/unused", "speed.cuda_graphs=true"])
    problems = config_problems(cfg, cuda_available=False, bf16_supported=False)
    assert any("speed.cuda_graphs=true replays compiled blocks; set speed.compile=true" in p for p in problems)
    cfg = compose(["output_dir=/tmp/unused", "speed=fast", "speed.cuda_graphs=true", "train.grad_accum=2"])
    problems = config_problems(cfg, cuda_available=False, bf16_supported=False)
    assert any("speed.cuda_graphs=true cannot accumulate gradients (train.grad_accum=2)" in p for p in problems)
    cfg = compose(["output_dir=/tmp/unused", "speed=fast", "speed.cuda_graphs=true", "train.grad_accum=1"])
    assert not config_problems(cfg, cuda_available=False, bf16_supported=False)
