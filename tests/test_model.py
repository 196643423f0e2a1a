"""The quantized base and its adapters: real bitsandbytes layers, real PEFT, real gradients."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from finetune.model import build_model, load_base
from finetune.run import compose
from finetune.source import load_tokenizer


def _cfg(model_dir, *overrides):
    return compose([f"model.name_or_path={model_dir}", "output_dir=/tmp/unused", *overrides])


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_nf4_base_has_4bit_layers_and_frozen_weights(tiny_llama):
    cfg = _cfg(tiny_llama)
    model = load_base(cfg.model, cfg.quant, str(tiny_llama), torch.device("cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    assert not any(p.requires_grad for p in model.parameters())


def test_an_eval_pass_does_not_change_training_gradients(tiny_llama, tokenizer):
    """Regression: bitsandbytes' CPU inference repacking used to cut gradients after any eval pass."""
    cfg = _cfg(tiny_llama, "lora.dropout=0.0")
    batch = tokenizer(["What is the capital of France? Paris."], return_tensors="pt")

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg, str(tiny_llama), torch.device("cpu"))[0]
        # LoRA B starts at zero; give it values so every adapter has a gradient path.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    reference = _lora_grads(fresh(), batch)
    model = fresh()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after_eval = _lora_grads(model, batch)
    assert reference.keys() == after_eval.keys() and len(reference) > 0
    for name in reference:
        torch.testing.assert_close(after_eval[name], reference[name], msg=name)
    q_grad = [g for n, g in after_eval.items() if "layers.0.self_attn.q_proj.lora_A" in n][0]
    assert q_grad.abs().sum() > 0


def test_tokenizer_without_pad_uses_eos(tiny_llama, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    cfg_tokenizer = tmp_path / "tokenizer_config.json"
    text = cfg_tokenizer.read_text().replace('"pad_token": "<|im_end|>"', '"pad_token": null')
    cfg_tokenizer.write_text(text)
    cfg = _cfg(tiny_llama, f"model.tokenizer={tmp_path}")
    loaded = load_tokenizer(cfg.model, str(tiny_llama))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
