"""The config schema, its per-section checks, preflight (every problem at once, before any weights
load), "did you mean" and other tools' names, and the clean exit-2 error block of the CLI."""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from finetune.config import (
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    LoraSettings,
    ModelConfig,
    QuantConfig,
    SpeedConfig,
    TrainConfig,
    normalize_overrides,
    schema_keys,
    suggest_key,
)
from finetune.preflight import _write_problem, config_problems, model_problems, notes, output_dir_problems, preflight
from finetune.run import compose
from tests.conftest import run_cli, tiny_run_args

ROOT = Path(__file__).resolve().parent.parent


def _problems(*overrides: str) -> list[str]:
    return config_problems(compose(["output_dir=/tmp/unused", *overrides]), cuda_available=False, bf16_supported=False)


def _weightless_copy(model_dir: Path, tmp_path: Path) -> Path:
    """The model folder without its weight files: whatever reads weights from it fails."""
    out = tmp_path / "weightless"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    return out


# --- each section checks its own fields -------------------------------------------------------------


def test_every_section_has_its_own_problems_method():
    for f in fields(Config):
        if f.name in SECTIONS:
            section = f.default_factory()
            assert is_dataclass(section) and section.problems() == [], f.name


@pytest.mark.parametrize("section, expected", [
    (LoraSettings(r=0, dropout=1.0), ["lora.r must be a positive integer (got 0)", "lora.dropout must be in [0, 1)"]),
    (QuantConfig(mode="nf5", quant_storage="bfloat16", max_memory={"gpu": "lots"}),
     ["quant.mode='nf5' is not one of nf4, fp4, int8, none (did you mean 'nf4'?)", "quant.max_memory has the key 'gpu'",
      "quant.max_memory[gpu]='lots' is not a size"]),
    (DataConfig(max_length=4, eval_split="test", eval_fraction=0.1),
     ["data.max_length must be at least 8 tokens (got 4)", "set data.eval_split or data.eval_fraction, not both"]),
    (TrainConfig(warmup_ratio=1.5, keep_last=0), ["train.warmup_ratio must be in [0, 1) (got 1.5)",
                                                  "train.keep_last must be at least 1 (got 0)"]),
    (TrainConfig(warmup_ratio=0.1, warmup_steps=3), ["set train.warmup_steps (3) or train.warmup_ratio (0.1), not both"]),
    (SpeedConfig(cuda_graphs=True, loss_chunk_size=-1), ["speed.cuda_graphs=true replays compiled blocks",
                                                         "speed.loss_chunk_size must be >= 0"]),
    (SpeedConfig(compile=True, cuda_graphs=True, offload_checkpoints=True, mlp_chunk_size=8),
     ["speed.offload_checkpoints=true would free nothing", "speed.mlp_chunk_size runs uncompiled"]),
    (SpeedConfig(compile=True, offload_checkpoints=True, offload_embeddings=True), []),
    (ModelConfig(architecture={"n_layer": 2}), ["model.architecture needs a model_type"]),
])
def test_a_section_reports_every_problem_of_its_own_fields(section, expected):
    problems = section.problems()
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(want in p for p in problems), (want, problems)


def test_a_section_leaves_rules_spanning_sections_and_devices_to_preflight():
    # fp16 needs a GPU, a paged optimizer needs CUDA: facts outside the train section.
    train = TrainConfig(mixed_precision="fp16", optimizer="paged_adamw_8bit")
    assert train.problems() == []
    cfg = compose(["output_dir=/tmp/unused", "train.mixed_precision=fp16", "train.optimizer=paged_adamw_8bit"])
    problems = config_problems(cfg, cuda_available=False, bf16_supported=False)
    assert any("fp16 needs a GPU" in p for p in problems) and any("pages optimizer state" in p for p in problems)


def test_config_problems_collects_several_sections_at_once():
    problems = _problems("lora.r=0", "data.max_length=4", "quant.mode=nf5", "train.keep_last=0", "sample.max_new_tokens=0",
                         "speed.loss_chunk_size=-1", "speed.compile=true", "speed.fp32_frozen=true")
    for want in ("lora.r must be", "data.max_length must be", "quant.mode='nf5'", "train.keep_last must",
                 "sample.max_new_tokens must", "speed.loss_chunk_size must", "gave NaN losses"):
        assert sum(want in p for p in problems) == 1, (want, problems)


# --- preflight: one ConfigError with everything, before weights ---------------------------------------


def test_preflight_reports_config_model_and_folder_problems_together_without_reading_weights(tiny_llama, tmp_path):
    model = _weightless_copy(tiny_llama, tmp_path)
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    cfg = compose([f"model.name_or_path={model}", f"output_dir={out}", "lora.r=0", "lora.target_modules=[q_projj]",
                   "speed.blocks_without_checkpointing=5", "+quant.int8_skip_modules=[down_prj]", "data.eval_fraction=2"])
    with pytest.raises(ConfigError) as info:
        preflight(cfg, out, tmp_path / "cache")
    problems = info.value.problems
    for want in ("lora.r must be a positive integer", "'q_projj', which this model does not have (did you mean 'q_proj'?)",
                 "speed.blocks_without_checkpointing=5 but the model has 2 checkpointed decoder blocks",
                 "quant.int8_skip_modules has 'down_prj'", "data.eval_fraction must be in [0, 1)",
                 f"output_dir={out} is a file"):
        assert sum(want in p for p in problems) == 1, (want, problems)
    assert len(problems) == 6, problems


def test_too_many_blocks_without_checkpointing_is_refused_by_the_cli_before_weights_load(
        tiny_llama, instruction_file, cache_dir, tmp_path):
    model = _weightless_copy(tiny_llama, tmp_path)
    result = run_cli(tiny_run_args(model, instruction_file, tmp_path / "run", f"model.tokenizer={tiny_llama}",
                                   "speed.blocks_without_checkpointing=3"), cache_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "finetune config error" in result.stderr and "Traceback" not in result.stderr
    assert "speed.blocks_without_checkpointing=3 but the model has 2 checkpointed decoder blocks" in result.stderr
    assert "footprint" not in result.stdout and not (tmp_path / "run" / "config.json").exists()


def test_a_device_map_missing_a_parameter_is_a_preflight_problem(tiny_llama, tmp_path):
    model = _weightless_copy(tiny_llama, tmp_path)
    cfg = compose([f"model.name_or_path={model}", f"output_dir={tmp_path / 'run'}",
                   "+quant.device_map={model.embed_tokens:cpu,model.layers:cpu,model.norm:cpu}"])
    with pytest.raises(ConfigError, match="quant.device_map gives no device to lm_head"):
        preflight(cfg, tmp_path / "run", tmp_path / "cache")


def test_flex_attention_dropout_of_a_bloom_config_is_a_preflight_problem_on_a_gpu(tiny_bloom, tmp_path):
    model = _weightless_copy(tiny_bloom, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    cfg = compose([f"model.name_or_path={model}", "output_dir=/tmp/unused", "model.attn_implementation=flex_attention"])
    assert any("attention_dropout=0.1" in p for p in model_problems(cfg, str(model), cuda_available=True))
    # On the CPU the run uses sdpa (no FlexAttention backward there), which applies the dropout.
    assert model_problems(cfg, str(model), cuda_available=False) == []


def test_packing_a_model_without_position_ids_is_a_preflight_problem(tiny_bloom, tmp_path):
    model = _weightless_copy(tiny_bloom, tmp_path)
    cfg = compose([f"model.name_or_path={model}", "output_dir=/tmp/unused", "data.packing=true"])
    assert any("data.packing=true needs a model that takes position ids" in p
               for p in model_problems(cfg, str(model), cuda_available=False))


# --- the output folder --------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_one_is_a_problem(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    assert output_dir_problems(tmp_path / "new" / "run") == []
    assert output_dir_problems(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert "is a file, not a folder" in output_dir_problems(file)[0]
    assert f"is under {file}, which is a file" in output_dir_problems(file / "sub" / "run")[0]


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_cli_refuses_an_output_dir_that_is_a_file_with_a_clean_error(where, cache_dir, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    out = file if where == "file" else file / "run"
    result = run_cli([f"output_dir={out}", "train.max_steps=3"], cache_dir, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "finetune config error" in result.stderr and "Traceback" not in result.stderr
    assert f"output_dir={out}" in result.stderr and file.read_text() == "x"


# --- values of the wrong type: one clean block, exit 2 ------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("lora.r=abc", "lora.r takes an integer (the default is lora.r=16)"),
    ("train.lr=fast", "train.lr takes a number (the default is train.lr=0.0002)"),
])
def test_a_value_of_the_wrong_type_is_one_clean_error_with_exit_2(override, expected, cache_dir, tmp_path):
    result = run_cli([override, f"output_dir={tmp_path}/run"], cache_dir, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().startswith("finetune config error: the config has 1 problem(s)")
    assert expected in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_compose_raises_a_config_error_for_a_wrong_type():
    with pytest.raises(ConfigError, match="lora.r takes an integer"):
        compose(["output_dir=/tmp/unused", "lora.r=abc"])


# --- did you mean, from the schema; other tools' names ------------------------------------------------


def test_a_typo_in_any_key_of_any_section_suggests_that_key():
    sections = set(SECTIONS)
    keys = [k for k in schema_keys() if "." in k and k.split(".")[0] in sections]
    assert {k.split(".")[0] for k in keys} == sections
    for key in keys:
        typo = key[:-1] + key[-1] * 2  # the last letter doubled
        _, _, problems = normalize_overrides([f"{typo}=1"])
        assert problems and f"did you mean '{key}'?" in problems[0], (typo, problems)


def test_speed_keys_get_a_suggestion():
    _, _, problems = normalize_overrides(["speed.compiel=true"])
    assert problems == ["unknown config key 'speed.compiel': did you mean 'speed.compile'? "
                        "`python -m finetune --cfg job` prints every key."]


def test_other_tools_names_are_read_as_ours_with_a_note():
    overrides, notes, problems = normalize_overrides(
        ["train.learning_rate=1e-3", "rank=4", "lora_alpha=8", "max_seq_length=128", "per_device_train_batch_size=2",
         "gradient_accumulation_steps=3", "dataset=embedded:terse_answers", "warmup_ratio=0.1"])
    assert problems == []
    assert "train.learning_rate=1e-3 is read as train.lr=1e-3 (finetune's name for it)" in notes
    cfg = compose([*overrides, "output_dir=/tmp/unused"])
    assert (cfg.train.lr, cfg.lora.r, cfg.lora.alpha, cfg.data.max_length) == (1e-3, 4, 8, 128)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.warmup_ratio) == (2, 3, 0.1)
    assert cfg.train.warmup_steps == 0  # a command-line warmup replaces the recipe's


def test_an_alias_under_another_section_is_only_suggested():
    assert suggest_key("train.learning_rate", sorted(schema_keys())) == "train.lr"
    _, notes, problems = normalize_overrides(["data.learning_rate=1e-3"])
    assert notes == [] and problems[0].startswith("unknown config key 'data.learning_rate': did you mean 'train.lr'?")


def test_epochs_are_refused_with_what_to_set_instead():
    for key in ("epochs", "num_train_epochs", "train.epochs"):
        _, _, problems = normalize_overrides([f"{key}=3"])
        assert len(problems) == 1 and "counts optimizer steps, not epochs: set train.max_steps" in problems[0]


def test_cli_accepts_an_alias_and_prints_the_note(cache_dir):
    result = run_cli(["learning_rate=5e-4", "--cfg", "job"], cache_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learning_rate=5e-4 is read as train.lr=5e-4" in result.stdout and "lr: 0.0005" in result.stdout


# --- warmup ---------------------------------------------------------------------------------------------


def test_the_default_recipe_takes_a_three_step_run():
    cfg = compose(["output_dir=/tmp/unused", "train.max_steps=3"])
    assert config_problems(cfg, cuda_available=False, bf16_supported=False) == []
    assert cfg.train.warmup_steps_for_run() == 0
    assert compose(["output_dir=/tmp/unused"]).train.warmup_steps_for_run() == 5  # the demo's 5 of 60 steps


def test_a_warmup_longer_than_the_run_is_shortened_with_a_note():
    train = TrainConfig(max_steps=3, warmup_steps=10)
    assert train.problems() == [] and train.warmup_steps_for_run() == 2
    assert "train.warmup_steps=10 is not shorter than train.max_steps=3: warming up for 2 steps instead" == \
        train.warmup_note()
    assert TrainConfig(max_steps=1, warmup_steps=1).warmup_steps_for_run() == 0
    assert TrainConfig(max_steps=100, warmup_ratio=0.1).warmup_steps_for_run() == 10
    assert TrainConfig(max_steps=100, warmup_steps=4).warmup_note() is None


def test_fused_lora_without_cuda_graphs_gets_a_note_that_names_the_fix():
    assert SpeedConfig(fused_lora=True, compile=True, cuda_graphs=True).fused_lora_note() is None
    assert SpeedConfig(fused_lora=False).fused_lora_note() is None
    assert "set speed.cuda_graphs=true" in SpeedConfig(fused_lora=True).fused_lora_note()
    offloaded = SpeedConfig(fused_lora=True, offload_checkpoints=True).fused_lora_note()
    assert "launched one by one from Python" in offloaded and "refused with speed.offload_checkpoints" in offloaded
    cfg = compose(["output_dir=/tmp/unused", "speed.fused_lora=true"])
    assert notes(cfg) == [cfg.speed.fused_lora_note()]


def test_a_command_line_warmup_replaces_the_recipes_and_both_at_once_are_refused():
    cfg = compose(["output_dir=/tmp/unused", "train.warmup_steps=2"])  # the demo recipe gives a ratio
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio, cfg.train.problems()) == (2, 0.0, [])
    both = compose(["output_dir=/tmp/unused", "train.warmup_steps=2", "train.warmup_ratio=0.1"])
    assert any("not both" in p for p in both.train.problems())


# --- random_init builds model.architecture: a mismatching name is refused ---------------------------


def test_random_init_with_another_models_name_is_refused_before_anything_is_built(tmp_path):
    cfg = compose(["recipe=bloom_nf4", "model.random_init=true", "model.name_or_path=some/llama",
                   f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="builds model.architecture, which describes bigscience/bloom-1b7") as info:
        preflight(cfg, tmp_path / "run", tmp_path / "cache")
    assert "model.architecture=null" in str(info.value)
    assert not (tmp_path / "cache").exists()  # no random model was built
    # The group's own name, or the architecture of the named model, is fine.
    assert compose(["recipe=bloom_nf4", "model.random_init=true", "output_dir=/tmp/unused"]).model.problems() == []
    assert compose(["recipe=bloom_nf4", "model.random_init=true", "model.name_or_path=some/llama",
                    "model.architecture=null", "output_dir=/tmp/unused"]).model.problems() == []


def test_random_init_refuses_a_local_folder_of_another_kind(tiny_llama, tmp_path):
    cfg = compose(["recipe=bloom_nf4", "model.random_init=true", f"model.name_or_path={tiny_llama}",
                   "model.architecture_of=null", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=f"builds model.architecture \\(bloom\\), but model.name_or_path={tiny_llama} "
                                          "is a llama model"):
        preflight(cfg, tmp_path / "run", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- layering -------------------------------------------------------------------------------------------


def _imports(path: Path, package: Path) -> set[str]:
    """finetune modules imported anywhere in `path` (module level and inside functions)."""
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "finetune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                name = f"{parent}.{node.module}" if node.module else parent
            else:
                name = node.module or ""
            if name.split(".")[0] != "finetune":
                continue
            found.add(name)
            # `from finetune import report` imports the submodule finetune.report.
            found |= {f"{name}.{a.name}" for a in node.names}
    return found


def test_no_import_cycle_in_the_package():
    package = ROOT / "finetune"
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {name: sorted(m for m in _imports(path, package) if m in files and m != name)
             for name, path in files.items()}
    assert graph["finetune.run"] and "finetune.config" in graph["finetune.quant"]  # the walk sees imports
    # A package's __init__ that imports its own submodules lazily is not a cycle of modules.
    graph = {n: [m for m in deps if not (files[m].name == "__init__.py" and n.startswith(m + "."))]
             for n, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_config_is_the_bottom_layer():
    assert _imports(ROOT / "finetune" / "config.py", ROOT / "finetune") == set()


@pytest.mark.parametrize("code, words", [
    (errno.EROFS, "is on a read-only filesystem"), (errno.ENOSPC, "is on a full disk"),
    (errno.EACCES, "is not writable by this user"),
])
def test_an_unwritable_output_dir_is_named_with_the_reason(code, words, tmp_path):
    # A read-only or full filesystem cannot be made here (tests run as root, without mounts); the
    # probe's OSError is what such a filesystem raises, so the message for each reason is checked.
    message = _write_problem(tmp_path / "run", tmp_path, OSError(code, os.strerror(code)))
    assert message.startswith(f"output_dir={tmp_path / 'run'} (its parent {tmp_path}) {words}")
