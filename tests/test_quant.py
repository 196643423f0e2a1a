"""Every bitsandbytes mode as a recipe setting: the layers it builds, its checks, training, saved bases.

All on the CPU with tiny random-weight models and real bitsandbytes layers (bnb 0.50 runs 4-bit and
8-bit on the CPU); GPU-only placement (a base split between GPU and CPU) is checked for its config
and error messages here and demonstrated by scripts/quant_table.py offload=true on a GPU.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from accelerate.state import AcceleratorState

from finetune.adapter import load_adapter
from finetune.model import build_model, load_base, prepare_for_training
from finetune.preflight import config_problems, model_problems
from finetune.run import compose, run
from tests.conftest import run_cli, tiny_run_args


def _cfg(model_dir, *overrides):
    return compose([f"model.name_or_path={model_dir}", "output_dir=/tmp/unused", *overrides])


def _problems(*overrides, cuda=False, model="/tmp/unused-model"):
    return config_problems(_cfg(model, *overrides), cuda_available=cuda, bf16_supported=cuda)


def _logits(model, batch):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch).logits.float()


# --- 1. each mode builds its layers ---------------------------------------------------------------


@pytest.mark.parametrize("mode, layer, quant_type", [
    ("nf4", bnb.nn.Linear4bit, "nf4"),
    ("fp4", bnb.nn.Linear4bit, "fp4"),
    ("int8", bnb.nn.Linear8bitLt, None),
    ("none", torch.nn.Linear, None),
])
def test_each_mode_builds_its_layers_and_keeps_the_head_unquantized(tiny_llama, mode, layer, quant_type):
    model_cfg = _cfg(tiny_llama, f"quant={mode}")
    model = load_base(model_cfg.model, model_cfg.quant, str(tiny_llama), torch.device("cpu"))
    linears = [m for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert len(linears) == 14 and all(type(m) is layer for m in linears), {type(m) for m in linears}
    if quant_type:
        assert all(m.weight.quant_state.quant_type == quant_type for m in linears)
    if mode == "int8":
        assert all(m.weight.dtype == torch.int8 and m.state.threshold == 6.0 for m in linears)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("overrides, check", [
    (["quant.double_quant=false"], lambda m: not m.weight.quant_state.nested),
    (["quant.double_quant=true"], lambda m: m.weight.quant_state.nested),
    (["quant.quant_storage=bfloat16"], lambda m: m.weight.dtype == torch.bfloat16),
    (["quant.quant_storage=float32"], lambda m: m.weight.dtype == torch.float32),
    (["quant.compute_dtype=float32"], lambda m: m.compute_dtype == torch.float32),
    (["quant.compute_dtype=float16", "train.mixed_precision=no"], lambda m: m.compute_dtype == torch.float16),
])
def test_4bit_settings_reach_the_layers(tiny_llama, overrides, check):
    model_cfg = _cfg(tiny_llama, *overrides)
    model = load_base(model_cfg.model, model_cfg.quant, str(tiny_llama), torch.device("cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and check(q_proj)


def test_int8_threshold_and_skip_modules_reach_the_layers(tiny_llama):
    cfg = _cfg(tiny_llama, "quant=int8", "quant.int8_threshold=0", "quant.int8_skip_modules=[down_proj]")
    model = load_base(cfg.model, cfg.quant, str(tiny_llama), torch.device("cpu"))
    layer = model.model.layers[1]
    assert type(layer.mlp.down_proj) is torch.nn.Linear and layer.mlp.down_proj.weight.dtype == torch.bfloat16
    assert isinstance(layer.mlp.up_proj, bnb.nn.Linear8bitLt) and layer.mlp.up_proj.state.threshold == 0.0
    # transformers drops its default skip list (the head) once skip modules are given; we keep it
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16


# --- 2. gradients through 8-bit layers on the CPU ---------------------------------------------------


def _lora_grads(model, batch, eval_first=False) -> dict[str, torch.Tensor]:
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_int8_lora_gradients_match_an_unquantized_reference_and_survive_an_eval_pass(tiny_llama, tokenizer):
    """bnb's CPU int8 path trains through dequantized weights and infers through int8 matmuls:
    an eval pass must not change what the training pass computes, and the adapters' gradients must
    be those of the unquantized model up to 8-bit rounding."""
    batch = tokenizer(["What is the capital of France? Paris. The quick brown fox"], return_tensors="pt")

    def fresh(mode):
        cfg = _cfg(tiny_llama, f"quant.mode={mode}", "quant.compute_dtype=float32", "lora.dropout=0.0")
        torch.manual_seed(0)
        model = build_model(cfg, str(tiny_llama), torch.device("cpu"))[0]
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give every adapter a gradient path
                torch.nn.init.normal_(p, std=0.02)
        return model

    reference = _lora_grads(fresh("none"), batch)
    int8 = _lora_grads(fresh("int8"), batch)
    after_eval = _lora_grads(fresh("int8"), batch, eval_first=True)
    assert reference.keys() == int8.keys() == after_eval.keys() and len(reference) == 28
    for name in reference:
        torch.testing.assert_close(after_eval[name], int8[name], msg=name)
        cos = torch.nn.functional.cosine_similarity(int8[name].flatten(), reference[name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))
    assert int8["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].abs().sum() > 0


# --- 3. every mode trains ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8", "none"])
def test_every_mode_trains_and_lowers_the_loss(mode, tiny_llama, instruction_file, cache_dir, tmp_path,
                                               fresh_accelerate_state):
    out = tmp_path / "run"
    cfg = compose(tiny_run_args(tiny_llama, instruction_file, out, f"quant.mode={mode}", "train.max_steps=6",
                                "train.lr=1e-2", "train.batch_size=8", "train.grad_accum=1", "lora.dropout=0.0"))
    summary = run(cfg, out, cache_dir=cache_dir).summary
    (start, before), (end, after) = summary["eval_loss"][0], summary["eval_loss"][-1]
    assert (start, end) == (0, 6) and after < before - 0.3, summary["eval_loss"]
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    assert json.loads((out / "adapter" / "finetune_manifest.json").read_text())["quant"]["mode"] == mode


def test_int8_with_skip_modules_trains_saves_and_reloads_through_the_cli(tiny_llama, instruction_file, cache_dir,
                                                                         tmp_path, tokenizer):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_llama, instruction_file, out, "quant=int8", "quant.int8_skip_modules=[down_proj]",
                         "train.max_steps=4", "train.lr=1e-2", "lora.dropout=0.0")
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8-bit LLM.int8 (outlier threshold 6), compute bfloat16, kept unquantized: down_proj" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]
    # bitsandbytes warns about the fp16 cast of int8 inputs once, not on every matmul
    assert result.stderr.count("inputs will be cast from") <= 1

    model, _, cfg = load_adapter(out, cache_dir=cache_dir)
    assert cfg.quant.mode == "int8" and cfg.quant.int8_skip_modules == ["down_proj"]
    base = model.base_model.model
    assert isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear8bitLt)
    assert type(base.model.layers[0].mlp.down_proj.base_layer) is torch.nn.Linear
    batch = tokenizer(["What is 3 plus 4?", "The quick brown fox"], return_tensors="pt", padding=True)
    with_adapter = _logits(model, batch)
    with model.disable_adapter():
        without = _logits(model, batch)
    assert (with_adapter - without).abs().max() > 1e-3  # the reloaded adapter is the trained one, not zeros


# --- 4. checks before loading --------------------------------------------------------------------


@pytest.mark.parametrize("overrides, cuda, message", [
    (["quant.int8_fp32_cpu_offload=true"], True,
     "quant.int8_fp32_cpu_offload needs quant.device_map naming the modules that go to the CPU"),
    (["quant.int8_fp32_cpu_offload=true", "+quant.max_memory={0:2GiB,cpu:30GiB}"], True,
     "with quant.max_memory alone, transformers quantizes every layer before it decides the placement"),
    (["quant=none", "quant.int8_fp32_cpu_offload=true", "+quant.device_map={lm_head:cpu}"], True,
     "quant.mode=none quantizes nothing"),
    (["quant=int8", "quant.int8_fp32_cpu_offload=true", "+quant.device_map={lm_head:cpu}"], False,
     "no GPU is visible (on the CPU the whole base is on the CPU already)"),
    (["quant=int8", "+quant.device_map={model:0,lm_head:cpu}"], True,
     "splits the base between a GPU and the CPU: transformers loads a quantized base split that way only with "
     "quant.int8_fp32_cpu_offload=true"),
    (["quant=int8", "quant.int8_fp32_cpu_offload=true", "+quant.device_map={model:0,lm_head:0}"], True,
     "quant.int8_fp32_cpu_offload is set but quant.device_map sends no module to 'cpu'"),
    (["+quant.device_map={model:disk}"], True, "sends 'model' to disk: training needs every module in memory"),
    (["+quant.device_map={model:0}"], False, "places modules on a GPU, but no GPU is visible"),
    (["+quant.device_map={model:0}", "+quant.max_memory={0:2GiB}"], True, "set quant.device_map or quant.max_memory, not both"),
    (["+quant.max_memory={0:lots}"], True, "quant.max_memory[0]='lots' is not a size"),
    (["quant=int8", "quant.quant_storage=bfloat16"], False, "quant.quant_storage applies to the 4-bit modes"),
    (["quant=int8", "quant.int8_threshold=-1"], False, "quant.int8_threshold must be >= 0"),
    (["quant=none", "quant.int8_skip_modules=[down_proj]"], False, "quant.mode=none quantizes nothing"),
    (["quant.compute_dtype=float16", "train.mixed_precision=bf16"], True, "mixes two half types"),
    (["quant.mode=int4"], False, "quant.mode='int4' is not one of nf4, fp4, int8, none (did you mean 'int8'?)"),
])
def test_invalid_quant_combinations_are_named_with_their_fix(overrides, cuda, message):
    problems = _problems(*overrides, cuda=cuda)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("overrides", [
    ["quant=int8", "quant.int8_fp32_cpu_offload=true", "+quant.device_map={model.embed_tokens:0,model.layers:0,model.norm:0,lm_head:cpu}"],
    ["quant=nf4", "quant.int8_skip_modules=[down_proj]"],
    ["quant=int8", "quant.int8_threshold=0"],
    ["quant=none", "quant.compute_dtype=float32"],
])
def test_valid_quant_combinations_pass(overrides):
    assert _problems(*overrides, cuda=True) == []


def test_quant_errors_that_need_the_model_are_reported_with_the_rest_before_loading(tiny_llama, instruction_file,
                                                                                    cache_dir, tmp_path):
    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "run", "quant=int8",
                         "quant.int8_skip_modules=[down_prj,model.layers.1]", "quant.int8_fp32_cpu_offload=true",
                         "+quant.device_map={model.embed_tokens:cpu,model.layer:cpu}")
    result = run_cli(args, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr
    assert "the config has 3 problem(s)" in err, err[-2000:]
    assert "quant.int8_skip_modules has 'down_prj', which matches no module of this model (did you mean 'down_proj'?)" in err
    assert "quant.device_map names 'model.layer', which is not a module of this model (did you mean 'model.layers'?)" in err
    assert "no GPU is visible" in err
    assert "model.layers.1'" not in err  # a module path is a valid skip entry
    assert "Loading weights" not in err and not (tmp_path / "run" / "adapter").exists()


def test_a_device_map_that_misses_a_parameter_is_refused_before_weights_load(tiny_llama):
    cfg = _cfg(tiny_llama, "+quant.device_map={model.embed_tokens:cpu,model.layers:cpu,model.norm:cpu}")
    assert config_problems(cfg, cuda_available=False, bf16_supported=False) == []
    # Read from the weightless copy: the preflight says it before any weight loads.
    problems = model_problems(cfg, str(tiny_llama), cuda_available=False)
    assert any("quant.device_map gives no device to lm_head" in p for p in problems), problems


def test_adapters_of_offloaded_layers_get_real_weights_and_train(tiny_llama, tokenizer, tmp_path):
    """On a GPU, quant.int8_fp32_cpu_offload leaves the CPU layers' weights on the meta device and
    streams them in for each forward; PEFT would create those layers' adapters on meta too. The same
    accelerate offloading, streaming from disk to the CPU, reproduces that here."""
    from accelerate import dispatch_model

    cfg = _cfg(tiny_llama, "quant=none", "quant.compute_dtype=float32", "lora.dropout=0.0")
    base = load_base(cfg.model, cfg.quant, str(tiny_llama), torch.device("cpu"))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    base = dispatch_model(base, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert base.model.layers[1].self_attn.q_proj.weight.is_meta
    torch.manual_seed(0)
    model = prepare_for_training(base, cfg.lora, cfg.quant, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 fp32_frozen=cfg.speed.fp32_frozen)
    lora_a = model.base_model.model.model.layers[1].self_attn.q_proj.lora_A.default.weight
    assert lora_a.device.type == "cpu" and lora_a.abs().sum() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.is_meta for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = tokenizer(["What is the capital of France? Paris. The quick brown fox"] * 4, return_tensors="pt")
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert lora_a.grad is None and (lora_a.detach() != 0).any()


# --- 5. a saved quantized base -------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_bases(tiny_llama, cache_dir, tmp_path_factory):
    """mode -> (folder written by `python -m finetune.quantize`, its CLI result), made once per mode."""
    made: dict = {}

    def get(mode: str):
        if mode not in made:
            out = tmp_path_factory.mktemp("saved") / f"tiny-{mode}"
            result = run_cli([f"model.name_or_path={tiny_llama}", f"quant={mode}", f"out={out}"], cache_dir,
                             module="finetune.quantize")
            assert result.returncode == 0, result.stderr[-3000:]
            made[mode] = (out, result)
        return made[mode]

    return get


@pytest.fixture(params=["nf4", "int8"])
def saved_base(request, saved_bases):
    return (request.param, *saved_bases(request.param))


def test_quantize_saves_the_base_with_its_quantization_config_and_tokenizer(saved_base):
    mode, out, result = saved_base
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_8bit"] if mode == "int8" else config["bnb_4bit_quant_type"] == "nf4"
    assert (out / "tokenizer.json").exists() and (out / "finetune_manifest.json").exists()
    assert f"model.name_or_path={out}" in result.stdout


def test_a_saved_base_gives_the_logits_of_the_on_the_fly_quantized_one(saved_base, tiny_llama, tokenizer):
    mode, out, _ = saved_base
    cfg = _cfg(out, f"quant={mode}")
    assert config_problems(cfg, cuda_available=False, bf16_supported=False) == []
    batch = tokenizer(["What is the capital of France? Paris.", "hi"], return_tensors="pt", padding=True)
    saved = load_base(cfg.model, cfg.quant, str(out), torch.device("cpu"))
    fresh_cfg = _cfg(tiny_llama, f"quant={mode}")
    fresh = load_base(fresh_cfg.model, fresh_cfg.quant, str(tiny_llama), torch.device("cpu"))
    layer = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(saved.model.layers[0].self_attn.q_proj, layer)
    assert saved.get_memory_footprint() == fresh.get_memory_footprint()
    torch.testing.assert_close(_logits(saved, batch), _logits(fresh, batch), rtol=0, atol=0)


def test_a_recipe_that_contradicts_a_saved_base_is_refused_with_the_fix(saved_base):
    mode, out, _ = saved_base
    other = "fp4" if mode == "int8" else "int8"
    problems = config_problems(_cfg(out, f"quant={other}"), cuda_available=False, bf16_supported=False)
    assert any(f"saved as {mode}, recipe quant.mode={other}" in p and f"Add `quant.mode={mode}`" in p for p in problems)
    if mode == "nf4":
        problems = config_problems(_cfg(out, "quant.double_quant=false"), cuda_available=False, bf16_supported=False)
        assert any("Add `quant.double_quant=true`" in p for p in problems), problems


def test_adapters_load_on_the_saved_and_the_on_the_fly_base_alike(saved_bases, tiny_llama, instruction_file,
                                                                   cache_dir, tmp_path, tokenizer,
                                                                   fresh_accelerate_state):
    mode = "nf4"  # the loading path is the same for int8, whose saved base is checked above
    saved, _ = saved_bases(mode)
    batch = tokenizer(["What is 3 plus 4?", "The quick brown fox"], return_tensors="pt", padding=True)
    for trained_on, other in ((saved, tiny_llama), (tiny_llama, saved)):
        AcceleratorState._reset_state(reset_partial_state=True)
        out = tmp_path / f"run-{trained_on.name}"
        cfg = compose(tiny_run_args(trained_on, instruction_file, out, f"quant={mode}", "train.max_steps=3",
                                    "train.lr=1e-2", "lora.dropout=0.0"))
        trained = run(cfg, out, cache_dir=cache_dir).model
        expected = _logits(trained, batch)
        on_own, _, _ = load_adapter(out, cache_dir=cache_dir)
        on_other, _, other_cfg = load_adapter(out, cache_dir=cache_dir, base=other)
        assert other_cfg.model.name_or_path == str(other) and other_cfg.quant.mode == mode
        torch.testing.assert_close(_logits(on_own, batch), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(on_other, batch), expected, rtol=0, atol=1e-5)
