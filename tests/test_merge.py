"""finetune.merge: the merged weights are what the adapter computed with, the folder is a plain
transformers model, and the parity report catches a wrong merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_run_args

from finetune.merge import (
    MergeError,
    dequantized_weight,
    lora_scale,
    merge_adapter,
    merged_tensors,
    quantized_linear_names,
    read_adapter_parts,
    write_model_files,
    write_shards,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama, instruction_file, cache_dir) -> Path:
    """A real 3-step run whose adapter moves the model a lot (high lr) and replaces the output head."""
    out = tmp_path_factory.mktemp("merge_run") / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "lora.modules_to_save=[lm_head]",
                                   "train.lr=1e-2"), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _cfg(run: Path):
    from finetune.adapter import read_adapter_manifest

    return read_adapter_manifest(run / "adapter").config


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_dequantized_weight_is_bit_exact_with_the_loaded_quantized_layer(tiny_llama, mode, device):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from finetune.model import load_base
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={tiny_llama}", "output_dir=/tmp/unused", f"quant={mode}"])
    model = load_base(cfg.model, cfg.quant, str(tiny_llama), torch.device(device))
    original = load_file(str(tiny_llama / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert set(layers) == quantized_linear_names(str(tiny_llama), cfg) and layers
    for name, layer in layers.items():
        if mode == "int8":
            loaded = F.int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB).float()
        else:
            loaded = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        ours = dequantized_weight(original[f"{name}.weight"].to(device), cfg.quant)
        assert torch.equal(ours, loaded), name


def test_lora_scale_is_peft_scaling_with_rslora_and_alpha_pattern(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 24})
    peft_model = get_peft_model(model, config)
    saved = json.loads(json.dumps(config.to_dict(), default=str))
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            module_name = name.removeprefix("base_model.model.")
            rank = module.lora_A["default"].weight.shape[0]
            assert lora_scale(saved, module_name, rank) == pytest.approx(module.scaling["default"], rel=1e-12), name


def test_merge_cli_writes_a_plain_transformers_folder_that_matches_the_adapter(tiny_run, tmp_path, cache_dir):
    out = tmp_path / "merged"
    result = run_cli([f"adapter={tiny_run}", f"out={out}", "max_shard_size=40KB", "device=cpu"], cache_dir,
                     module="finetune.merge")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity: OK" in result.stdout and "peak RSS" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md", "parity.json"):
        assert (out / name).is_file(), name
    parity = json.loads((out / "parity.json").read_text())
    assert parity["failures"] == [] and parity["target"] == "adapter_quantized"
    promised = parity["comparisons"]["merged vs adapter_quantized"]
    assert promised["top1_agreement"] == 1.0 and promised["kl"] < 1e-4
    assert "merged vs adapter_quantized" in (out / "README.md").read_text()

    # Loads on a machine without this project: plain transformers in a fresh interpreter.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert 'finetune' not in sys.modules\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is 1 plus 2?'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "print('OK', m.dtype, m.generate(**ids, max_new_tokens=3, do_sample=False).shape)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0 and "OK torch.bfloat16" in loaded.stdout, loaded.stderr[-2000:]

    # Each merged weight is PEFT's own: the loaded 4-bit layer's weight + scaling * B @ A.
    import bitsandbytes.functional as F
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from finetune.adapter import load_adapter

    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_file(str(out / shard)))
    adapted, _, _ = load_adapter(tiny_run, device=torch.device("cpu"), cache_dir=cache_dir)
    checked = 0
    for name, module in adapted.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            w = F.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            expected = w + module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(merged[key], expected.to(torch.bfloat16)), key
            checked += 1
    assert checked == 14
    head = adapted.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged["lm_head.weight"], head.to(torch.bfloat16))


def test_original_base_merge_matches_the_adapter_on_the_16bit_base(tiny_run, tiny_llama, tmp_path, cache_dir):
    from safetensors.torch import load_file

    result = merge_adapter(tiny_run, tmp_path / "orig", base="original", dtype="float32", cache_dir=cache_dir,
                           parity_rows=4, log=lambda s: None, device="cpu")
    assert result.parity["failures"] == [] and result.parity["target"] == "adapter_16bit"
    merged = load_file(str(tmp_path / "orig" / "model.safetensors"))
    original = load_file(str(tiny_llama / "model.safetensors"))
    parts = read_adapter_parts(tiny_run / "adapter")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[name], original[name].float() + parts.deltas[name].delta())
    # The report carries the merge's own time and peak memory (no GPU figure on the CPU).
    saved = json.loads((tmp_path / "orig" / "parity.json").read_text())["resources"]
    assert saved == result.resources and saved["device"] == "cpu" and saved["merge_peak_gpu_gib"] is None
    assert 0 < saved["merge_peak_rss_gib"] <= saved["peak_rss_gib"] < 64
    assert 0 < saved["merge_seconds"] <= saved["seconds"]


def _planted(tiny_run: Path, folder: Path, cache_dir: Path, **bug) -> dict:
    """Merge with a planted bug through the same lower-level steps, then run the parity check on it."""
    from finetune.adapter import read_adapter_manifest
    from finetune.parity import parity_report
    from finetune.source import resolve_model_source

    cfg = read_adapter_manifest(tiny_run / "adapter").config
    source = resolve_model_source(cfg.model, cache_dir, seed=cfg.train.seed)
    parts = read_adapter_parts(tiny_run / "adapter")
    folder.mkdir()
    tensors = merged_tensors(source, parts, base="dequantized", quant=cfg.quant,
                             quantized=quantized_linear_names(source, cfg), dtype=torch.bfloat16, **bug)
    write_shards(tensors, folder, 10**9)
    write_model_files(folder, source, cfg, torch.bfloat16, untie=False)
    return parity_report(folder, tiny_run / "adapter", cfg, source, base="dequantized", rows=4, log=lambda s: None)


def test_parity_fails_a_merge_with_alpha_instead_of_alpha_over_r(tiny_run, tmp_path, cache_dir):
    cfg = _cfg(tiny_run)
    report = _planted(tiny_run, tmp_path / "bug", cache_dir, scale=lambda name, d: float(cfg.lora.alpha))
    assert report["failures"], report["table"]
    assert "FAILED" in report["table"]


def test_parity_fails_a_merge_that_forgets_modules_to_save(tiny_run, tmp_path, cache_dir):
    report = _planted(tiny_run, tmp_path / "bug", cache_dir, skip_replaced=True)
    assert report["failures"], report["table"]
    assert any("modules_to_save" in f or "KL" in f for f in report["failures"])


def test_bad_arguments_exit_2_before_loading_anything(tiny_run, tmp_path, capsys):
    from finetune.merge import main

    existing = tmp_path / "exists"
    existing.mkdir()
    cases = {
        f"out={existing}": "already exists",
        "base=fp16": "base=dequantized",
        "format=onnx": "format=onnx",
        "gguf_type=q4_k": "gguf_type=q4_k",
        "max_shard_size=big": "max_shard_size=big",
        "outt=x": "did you mean 'out'",
        "prompts=/no/such/file": "prompts=/no/such/file is not a file",
        "device=tpu": "device=tpu is not a device",
        "device=cuda:99": "device=cuda:99 but this machine has",
    }
    for arg, expected in cases.items():
        args = [f"adapter={tiny_run}", *([] if arg.startswith("out=") else [f"out={tmp_path / 'new'}"]), arg]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err, (arg, err)
    assert not (tmp_path / "new").exists()


def test_push_to_hub_offline_exits_2_and_writes_nothing(tiny_run, tmp_path, cache_dir):
    result = run_cli([f"adapter={tiny_run}", f"out={tmp_path / 'new'}", "push_to_hub=me/model"], cache_dir,
                     module="finetune.merge")
    assert result.returncode == 2 and "push_to_hub" in result.stderr and "network" in result.stderr
    assert not (tmp_path / "new").exists()


def test_base_original_refused_as_dequantized_when_trained_unquantized(tiny_llama, instruction_file, tmp_path, cache_dir):
    run = tmp_path / "run16"
    trained = run_cli(tiny_run_args(tiny_llama, instruction_file, run, "quant=none", "train.max_steps=1",
                                    "train.grad_accum=1"), cache_dir)
    assert trained.returncode == 0, trained.stderr[-2000:]
    with pytest.raises(MergeError, match="base=original"):
        merge_adapter(run, tmp_path / "m", base="dequantized", cache_dir=cache_dir)


def test_top1_agreement_is_judged_where_the_reference_is_decided():
    from finetune.parity import DECIDED_MARGIN, compare

    torch.manual_seed(0)
    ref = torch.randn(40, 50)
    ref[:30, 7] = ref[:30].max(-1).values + 2 * DECIDED_MARGIN  # 30 decided positions: token 7 leads clearly
    ref[30:, 3] = ref[30:].max(-1).values + 1e-3  # 10 near-ties between token 3 and the runner-up
    other = ref.clone()
    other[30:, 3] -= 2e-3  # rounding-sized changes swap the near-tied tokens only
    c = compare([ref], [other])
    assert c["top1_agreement"] == pytest.approx(0.75)
    assert c["decided_positions"] == 30 and c["top1_agreement_decided"] == 1.0
    other[:3, 7] -= 4 * DECIDED_MARGIN  # a real change: decided positions now disagree
    assert compare([ref], [other])["top1_agreement_decided"] == pytest.approx(27 / 30)
