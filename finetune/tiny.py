"""Offline stand-ins for hub downloads: a small trained tokenizer and random-weight models.

Tests, benchmarks and GPU shape runs need a tokenizer and a model folder on machines with no
hub. The tokenizer is a real byte-level BPE trained here on a fixed corpus, with a ChatML chat
template and pad == eos (as SmolLM2 and many chat models have), so the edge cases are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Instruction: answer briefly. Response: yes, no, maybe, 0 1 2 3 4 5 6 7 8 9.",
    "Fine-tuning adapts a pretrained language model to new data with low-rank adapters.",
    "### Instruction:\n### Response:\nuser assistant system",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A trained byte-level BPE tokenizer with ChatML special tokens and pad == eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    ),
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4),
}


def save_random_model(out_dir: str | Path, architecture: dict[str, Any], tokenizer=None, seed: int = 0) -> Path:
    """Build a causal LM with random weights from `architecture` and save it with a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    arch = dict(architecture)
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", len(tokenizer))
    config = AutoConfig.for_model(
        model_type,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
