"""The real CLI (`python -m finetune`) on tiny models with real bitsandbytes 4-bit layers."""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from tests.conftest import run_cli, tiny_run_args


@pytest.fixture(scope="module")
def finished_run(tiny_llama, instruction_file, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "lora.r=4", "lora.alpha=8",
                                   "lora.target_modules=[q_proj,v_proj]", "lora.dropout=0.0"), cache_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_run_writes_a_peft_adapter_and_no_base_weights(finished_run):
    out, result = finished_run
    adapter = out / "adapter"
    files = sorted(p.name for p in adapter.iterdir())
    # PEFT's standard files (plus its model card) and our manifest; nothing else
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "finetune_manifest.json"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(keys) == 8
    # no base weights anywhere in the run folder
    assert not list(out.rglob("model.safetensors")) and not list(out.rglob("pytorch_model.bin"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0 and summary["steady_tokens_per_s"] > 0 and summary["compile_warmup_steps"] >= 1
    assert "finetune: done" in result.stdout and "footprint" in result.stdout
    assert "tokens/s steady state, after" in result.stdout
    # the picture of the run: loss, learning rate and tokens/s panels, 260 px each
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") == 3 * 260
    assert f"curves       {out / 'curves.png'}" in result.stdout


def test_overrides_reach_the_saved_adapter_config(finished_run):
    out, _ = finished_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["max_steps"] == 3


def test_start_summary_reports_footprint_params_and_tokens(finished_run):
    _, result = finished_run
    out = result.stdout
    assert "4-bit NF4, double-quant, compute bfloat16" in out
    trainable, total = map(lambda n: int(n.replace(",", "")),
                           re.search(r"trainable    ([\d,]+) of ([\d,]+) parameters", out).groups())
    assert 0 < trainable < total
    tokens, trained = map(int, re.search(r"train tokens: (\d+), trained on: (\d+) \(\d+%\)", out).groups())
    assert 0 < trained < tokens  # instruction data: prompts are not trained on


def test_unknown_key_fails_with_the_key_that_was_meant(tmp_path, cache_dir):
    result = run_cli(["lora.alhpa=8", "train.maxsteps=3", f"output_dir={tmp_path}/run"], cache_dir)
    assert result.returncode == 2
    assert "unknown config key 'lora.alhpa': did you mean 'lora.alpha'?" in result.stderr
    assert "did you mean 'train.max_steps'?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cross_field_errors_are_reported_together_before_the_model_loads(tiny_llama, instruction_file, cache_dir, tmp_path):
    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "run",
                         "lora.r=0", "lora.target_modules=[q_projj]", "train.warmup_ratio=1.5", "quant.mode=nf5")
    result = run_cli(args, cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr
    assert "the config has 4 problem(s)" in err
    assert "lora.r must be a positive integer (got 0)" in err
    assert "'q_projj', which this model does not have (did you mean 'q_proj'?)" in err
    assert "train.warmup_ratio must be in [0, 1) (got 1.5)" in err
    assert "quant.mode='nf5' is not one of nf4, fp4, int8, none (did you mean 'nf4'?)" in err
    assert "Loading weights" not in err and not (tmp_path / "run" / "adapter").exists()


def test_wrong_type_is_rejected(cache_dir, tmp_path):
    result = run_cli(["lora.r=abc", f"output_dir={tmp_path}/run"], cache_dir)
    assert result.returncode == 2
    assert "finetune config error" in result.stderr and "Traceback" not in result.stderr
    assert "Value 'abc' of type 'str' could not be converted to Integer" in result.stderr



def test_architecture_as_a_mapping_on_the_command_line(cache_dir, tmp_path):
    # model.architecture is null by default: a mapping given for it once ended in an OmegaConf AttributeError.
    from finetune.config import ConfigError
    from finetune.run import compose

    sizes = run_cli([f"output_dir={tmp_path}/run", "model.architecture={hidden_size:64}"], cache_dir)
    assert sizes.returncode == 2 and "Traceback" not in sizes.stderr, sizes.stderr[-3000:]
    assert "model.architecture needs a model_type (e.g. llama, bloom) besides its sizes" in sizes.stderr
    assert "footprint" not in sizes.stdout and not (tmp_path / "run" / "config.json").exists()  # before any model loads

    shown = run_cli(["model.architecture={model_type:llama,hidden_size:64}", "+model.architecture.num_hidden_layers=2",
                     "--cfg", "job"], cache_dir)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "  architecture:\n    model_type: llama\n    hidden_size: 64\n    num_hidden_layers: 2\n" in shown.stdout
    with pytest.raises(ConfigError, match=r"to add it, prefix the override with \+: \+model.architecture.n_layer=2"):
        compose(["output_dir=/tmp/unused", "model.architecture.n_layer=2"])
    assert compose(["output_dir=/tmp/unused", "model=bloom_1b7", "model.architecture.n_layer=2"]).model.architecture["n_layer"] == 2

def test_cfg_job_prints_the_composed_config_with_overrides(cache_dir):
    result = run_cli(["recipe=bloom_nf4", "lora.r=32", "--cfg", "job"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert "name_or_path: bigscience/bloom-1b7" in result.stdout
    assert "r: 32" in result.stdout and "mode: nf4" in result.stdout and "optimizer: paged_adamw_32bit" in result.stdout


def test_existing_run_is_never_overwritten(finished_run, tiny_llama, instruction_file, cache_dir):
    out, _ = finished_run
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out), cache_dir)
    assert result.returncode == 2 and "already holds a finished run" in result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_sweep_gives_each_job_its_own_folder(tiny_llama, instruction_file, cache_dir, tmp_path):
    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "sweep", "train.max_steps=1")
    result = run_cli(["-m", *args, "lora.r=2,4"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "sweep" / str(i) / "adapter" / "adapter_config.json").read_text())["r"] for i in (0, 1)]
    assert ranks == [2, 4]


def test_generate_cli_loads_the_adapter_and_prints_text(finished_run, cache_dir):
    out, _ = finished_run
    result = run_cli([f"adapter={out}", "prompt=What is 2 plus 3?", "max_new_tokens=5"], cache_dir, module="finetune.generate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt: What is 2 plus 3?" in result.stdout


def test_generate_cli_rejects_a_folder_without_adapter(tmp_path, cache_dir):
    result = run_cli([f"adapter={tmp_path}", "prompt=hi"], cache_dir, module="finetune.generate")
    assert result.returncode != 0 and "holds no adapter" in result.stderr


def test_bloom_recipe_builds_random_weights_from_its_architecture(tmp_path, cache_dir, instruction_file, tiny_llama):
    # The bloom_nf4 recipe with the architecture shrunk: the path GPU shape runs take with no hub.
    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "run", "recipe=bloom_nf4",
                         "model.random_init=true", f"model.tokenizer={tiny_llama}",
                         "model.architecture.hidden_size=64", "model.architecture.n_layer=2",
                         "model.architecture.n_head=4", "model.architecture.vocab_size=512",
                         "train.optimizer=adamw")
    args = [a for a in args if not a.startswith("model.name_or_path")]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bigscience/bloom-1b7" in result.stdout and "[random weights]" in result.stdout
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    leaves = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert leaves == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


@pytest.mark.parametrize("packing", [False, True])
def test_compiled_run_trains_as_the_eager_run(packing, tiny_llama, instruction_file, cache_dir, tmp_path):
    """speed=fast with CUDA graphs (none on the CPU: blocks run compiled; batches padded to
    data.max_length), the compiled chunked loss and a block without checkpointing, on padded and on
    packed rows: the real loop gives the eager run's losses and evaluations."""
    runs = {}
    compiled = ["speed=fast", "speed.cuda_graphs=true", "speed.blocks_without_checkpointing=1"]
    for name, extra in [("eager", []), ("compiled", compiled)]:
        out = tmp_path / name
        result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "lora.dropout=0.0", "train.eval_every=2",
                                       "speed.fp32_frozen=false", "train.max_steps=4", f"data.packing={packing}",
                                       "train.grad_accum=1",  # CUDA graphs cannot accumulate
                                       *extra), cache_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = json.loads((out / "summary.json").read_text())
    eager, compiled = runs["eager"], runs["compiled"]
    assert [s for s, _ in compiled["losses"]] == [1, 2, 3, 4]
    assert compiled["eval_loss"][-1][1] < compiled["eval_loss"][0][1]  # it learns
    for (_, a), (_, b) in zip(eager["losses"] + eager["eval_loss"], compiled["losses"] + compiled["eval_loss"]):
        assert b == pytest.approx(a, rel=2e-3)
