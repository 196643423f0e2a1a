"""finetune.gguf_export: a merged llama-family model written as GGUF reads back (transformers' GGUF
loader) with the merged model's logits and tokenizer; other architectures are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.gguf_export import GGUFExportError, export_gguf

# transformers' GGUF loader de-quantizes to fp32; f16 rounding of a bf16 model is exact or tiny,
# Q8_0 (8-bit blocks of 32) moves logits more.
TOLERANCE = {"f16": 1e-3, "bf16": 1e-5, "q8_0": 0.05}


FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def _merged(root: Path, family: str, tokenizer) -> Path:
    """A random bf16 model folder of `family` standing in for a merged model (the merge writes this kind)."""
    from transformers import AutoModelForCausalLM

    from finetune.tiny import save_random_model

    src = save_random_model(root / f"{family}-src", FAMILIES[family], tokenizer)
    out = root / family
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged_llama(tmp_path_factory, tokenizer) -> Path:
    return _merged(tmp_path_factory.mktemp("merged"), "llama", tokenizer)


def _logit_diff(folder: Path, gguf_path: Path) -> tuple[float, bool]:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 100, 7, 300, 2, 11]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)(ids).logits
    return (reference - loaded).abs().max().item(), torch.equal(reference.argmax(-1), loaded.argmax(-1))


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_reads_back_with_the_merged_models_logits(merged_llama, tmp_path, gguf_type):
    path = export_gguf(merged_llama, tmp_path / f"m-{gguf_type}.gguf", gguf_type, log=lambda s: None)
    diff, same_top1 = _logit_diff(merged_llama, path)
    print(f"gguf llama {gguf_type}: max |dlogit| {diff:.3g}")
    assert diff <= TOLERANCE[gguf_type] and same_top1, diff


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_gguf_of_other_llama_families_reads_back(tmp_path, tokenizer, family):
    folder = _merged(tmp_path, family, tokenizer)
    (tmp_path / "gguf").mkdir()
    path = export_gguf(folder, tmp_path / "gguf" / "m.gguf", "bf16", log=lambda s: None)
    diff, same_top1 = _logit_diff(folder, path)
    print(f"gguf {family} bf16: max |dlogit| {diff:.3g}")
    assert diff <= TOLERANCE["bf16"] and same_top1, diff


def test_gguf_tokenizer_and_chat_template_read_back(merged_llama, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    path = export_gguf(merged_llama, tmp_path / "m.gguf", "f16", log=lambda s: None)
    ours = AutoTokenizer.from_pretrained(merged_llama)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "What is the capital of France? <|im_start|>user\nyes<|im_end|>"
    assert back(text)["input_ids"] == ours(text)["input_ids"]
    reader = gguf.GGUFReader(str(path))
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == ours.chat_template
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == ours.eos_token_id


def test_gguf_refuses_other_architectures_naming_the_supported(tiny_bloom, tmp_path):
    with pytest.raises(GGUFExportError, match="llama.*mistral.*qwen2"):
        export_gguf(tiny_bloom, tmp_path / "b.gguf", "f16", log=lambda s: None)
