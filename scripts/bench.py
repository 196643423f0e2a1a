"""This project's QLoRA training step against the standard Hugging Face QLoRA recipe, same shapes and tokens.

    python scripts/bench.py --shape bloom-1b7 --batch 4 --seq 2048
    python scripts/bench.py --shape llama3-8b --batch 2 --seq 2048

The HF recipe: transformers `Trainer` + peft LoRA r=16 on all linear layers + bitsandbytes NF4,
double quantization, bf16 compute, `paged_adamw_32bit`, gradient checkpointing. Ours: the same
settings through finetune's model builders and loop step. Models are built from configs with
random weights (no hub). Both sides see the same rows in the same order: Zipf-distributed token
ids, so the loss has something to learn and the two loss curves can be compared.

More runs of our side with config overrides (the README's "Speed and memory" tables):

    python scripts/bench.py --shape llama3-8b --batch 2 --variant fast_adamw=speed=fast,train.optimizer=adamw

Each side runs in its own subprocess so peak memory is its own. Prints tokens/s (timed steps after
warm-up, each step synchronized), peak memory (torch.cuda.max_memory_allocated while training, the
weights included; paged optimizer state is not counted), MFU against a bf16 matmul rate measured
here, and the ratios. With nvidia-ml-py installed, each side's mean power and SM clock over its timed
steps and its energy per token (an H200 runs our steps at its power limit: docs/decisions.md).
`--sides ours --override speed=fast --profile` prints the top CUDA kernels; `--sync-debug` lists where
our timed steps make the host wait for the GPU (timings then do not count).

    python scripts/bench.py --shape llama3-8b --batch 1 --max-seq 8192,16384,32768,65536

trains two steps (--max-seq-steps) at each length in turn and reports the longest that fits in GPU memory.

Peers, trained by the same Trainer, rows, batch and optimizer settings as the HF recipe: `unsloth`
(its 4-bit loader, LoRA r/alpha as above on all linear layers, its offloaded checkpointing) and `liger`
(the HF recipe with liger-kernel's kernels patched in). Their packages (../shared/device/make-peer-wheels.sh
and liger-kernel, as wheels in .peerwhl) pin older datasets and trl, so they go in a folder of their
own that only the peers' processes see first on their path:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .peerwhl/*.whl
    python scripts/bench.py --shape llama3-8b --batch 2 --sides hf,unsloth,liger --peer-site /tmp/peers

A peer's non-finite loss or gradient prints its grad norms and its own messages by step; `--diagnose`
then runs it again with probes (the first module whose output is non-finite, the parameters whose
gradient arrives non-finite, each row of that batch alone). `--ids uniform`, `--peer-import-late`,
`--trainer-lr` and `--trainer-optim` change the rows, unsloth's import order and the Trainer sides'
optimizer, to test a cause of a non-finite loss (the README, "Against peers: unsloth and HF + Liger kernels").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

SHAPES = {
    "tiny-llama": dict(  # for running scripts/block_memory.py on the CPU (tests/test_recompute.py)
        model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=448, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    ),
    "bloom-1b7": dict(model_type="bloom", vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16),
    "llama3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
LR, LORA_R, LORA_ALPHA, LORA_DROPOUT = 2e-4, 16, 32, 0.05
OPTIM = "paged_adamw_32bit"  # the HF recipe's optimizer, on both sides unless --trainer-optim changes the Trainer's


# ----------------------------------------------------------------------------------------------
# FLOPs: LoRA on a frozen base, gradient checkpointing. Per token: 2N forward, 2N recompute,
# 2N for activation gradients (no weight gradients for the frozen base), plus causal attention
# scores and values (2 * 2 * L * s * d per token forward, halved by the causal mask, x4 passes
# for forward, recompute and the two-matmul backward). N counts every matmul weight, lm_head included.
# ----------------------------------------------------------------------------------------------
def flops_per_token(config, seq: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    layers, hidden = config.num_hidden_layers, config.hidden_size
    attention = 4 * (2 * layers * seq * hidden)  # causal: half of 4*L*s*d, for 4 passes
    return 6 * n_matmul + attention, n_matmul


def measure_bf16_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def build_random_model(shape: str, out: Path) -> Path:
    """Save a random-weight bf16 model of `shape` (built on the GPU: an 8B init on CPU takes minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    arch = dict(SHAPES[shape])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def make_examples(n: int, seq: int, min_len: int, seed: int = 0, uniform_over: int = 0) -> list[torch.Tensor]:
    """Examples of token ids drawn from a Zipf law over 1,024 ids (a unigram law a LoRA learns fast),
    or with `uniform_over`, uniform over that many ids (the pad, bos and eos ids 0-2 among them), of
    lengths uniform in [min_len, seq] (all `seq` when min_len == seq)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, 1025, dtype=torch.float64)
    probs = (1 / ranks) / (1 / ranks).sum()
    lengths = torch.randint(min_len, seq + 1, (n,), generator=gen) if min_len < seq else torch.full((n,), seq)
    if uniform_over:
        return [torch.randint(0, uniform_over, (int(k),), generator=gen) for k in lengths]
    return [torch.multinomial(probs, int(k), replacement=True, generator=gen) + 3 for k in lengths]


def make_batches(examples: list[torch.Tensor], batch: int, seq: int, packing: bool,
                 widths: list[int] | None = None) -> list[dict]:
    """Right-padded batches of `batch` examples, or of `batch` packed rows of at most `seq` tokens,
    through finetune's own collator and packer."""
    import datasets

    from finetune.data import Collator
    from finetune.packing import pack

    rows = datasets.Dataset.from_list([{"input_ids": e.tolist(), "labels": e.tolist()} for e in examples])
    if packing:
        rows = pack(rows, seq)
    collate = Collator(pad_token_id=0, widths=widths)
    return [collate([rows[j] for j in range(i, i + batch)]) for i in range(0, len(rows) - batch + 1, batch)]


# ----------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ----------------------------------------------------------------------------------------------
def train_each(batch_sets: list[list[dict]], train) -> None:
    """`train` on each set of batches in turn (the same model), each with its own peak memory; stops
    at the first set that runs out of GPU memory and marks it so. Prints each set's result as a
    `SET` line when it is done, so a worker that crashes later still reports what it measured."""
    for batches in batch_sets:
        seq = batches[0]["input_ids"].shape[1]
        torch.cuda.reset_peak_memory_stats()
        try:
            result = train(batches)
        except torch.OutOfMemoryError:
            print("SET " + json.dumps({"oom": True, "seq": seq}), flush=True)
            return
        result.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, seq=seq)
        print("SET " + json.dumps(result), flush=True)


PEER_SIDES = ("unsloth", "liger")  # sides whose worker runs with the peer packages first on sys.path


def hf_peft_model(model_dir: str):
    """The HF recipe's model: bitsandbytes NF4 with double quantization, peft's k-bit preparation, LoRA
    on all linear layers. Liger's side builds the same model after patching transformers' classes."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def liger_model(model_dir: str):
    """The HF recipe with liger-kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear
    cross-entropy) patched into transformers' model classes before the model is built."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SystemExit(f"liger-kernel has no kernels for model type {model_type!r}; "
                         f"it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]()
    return hf_peft_model(model_dir)


def plain_tokenizer(vocab_size: int, out: Path) -> Path:
    """Save a word-level tokenizer with one token per id beside the model: unsloth's loader reads the
    model folder's tokenizer and the random model has none. Pad 0, bos 1, eos 2 as in the model's config (make_examples' ids start at 3)
    and the collator pads with 0, so unsloth adds no token and resizes nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return out
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    tokenizer.save_pretrained(out)
    return out


def unsloth_model(model_dir: str, seq: int):
    """unsloth's QLoRA path: its 4-bit loader and patched model, LoRA r and alpha as the HF recipe on
    all linear layers, its offloaded gradient checkpointing."""
    from transformers import AutoConfig
    from unsloth import FastLanguageModel  # run_worker imported unsloth before transformers

    plain_tokenizer(AutoConfig.from_pretrained(model_dir).vocab_size, Path(model_dir))
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, dtype=torch.bfloat16,
                                                 max_seq_length=seq)
    torch.manual_seed(0)
    return FastLanguageModel.get_peft_model(
        model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, bias="none", random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", max_seq_length=seq)


def worker_trainer(side: str, model_dir: str, batch_sets: list[list[dict]], batch: int, seq: int, warmup: int,
                   diagnose: bool = False, unsloth_trainer_checkpointing: bool = False, lr: float = LR,
                   optim: str = OPTIM) -> None:
    """A side trained by transformers' Trainer with the HF recipe's arguments: hf, liger or unsloth."""
    if side == "unsloth":
        model = unsloth_model(model_dir, seq)
    elif side == "liger":
        model = liger_model(model_dir)
    else:
        model = hf_peft_model(model_dir)
    # unsloth's model checkpoints its blocks itself (get_peft_model's use_gradient_checkpointing), as in
    # its own recipes; the Trainer's checkpointing would wrap transformers' checkpoint around the blocks
    # (--unsloth-trainer-checkpointing does that anyway, to test whether it made an earlier try's losses NaN)
    trainer_checkpointing = side != "unsloth" or unsloth_trainer_checkpointing
    train_each(batch_sets, lambda batches: train_with_trainer(model, batches, batch, warmup, trainer_checkpointing,
                                                              diagnose, lr, optim))


def train_with_trainer(model, batches: list[dict], batch: int, warmup: int, checkpointing: bool = True,
                       diagnose: bool = False, lr: float = LR, optim: str = OPTIM) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    # One row per example, in batch order; the Trainer pads them with finetune's collator (labels -100).
    from finetune.data import Collator

    examples = [{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
                 "labels": b["labels"][i][b["attention_mask"][i].bool()].tolist()}
                for b in batches for i in range(len(b["input_ids"]))]
    dataset = Dataset.from_list(examples)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.grad_norms, self._t = [], [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            # a marker between the libraries' own messages, so a problem can be placed at its step
            print(f"STEP {state.global_step + 1}", file=sys.stderr, flush=True)
            torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            power.read()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.grad_norms.append(float(logs.get("grad_norm", math.nan)))

    class InOrderTrainer(Trainer):
        # Same rows in the same order as our side, so the loss curves are comparable.
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    timer, power = Timer(), GpuPower()
    callbacks = [timer] + ([non_finite_probe(model, batches)] if diagnose else [])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=len(batches), learning_rate=lr,
            lr_scheduler_type="constant", optim=optim, bf16=True, gradient_checkpointing=checkpointing,
            logging_steps=1, report_to="none", save_strategy="no", remove_unused_columns=False, seed=0,
            dataloader_drop_last=True, logging_nan_inf_filter=False,  # the filter logs a NaN loss as a finite one
        )
        InOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(0),
                       callbacks=callbacks).train()
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    return {"step_seconds": timer.times, "losses": timer.losses, "grad_norms": timer.grad_norms, "step_tokens": tokens,
            **power.summary(warmup)}


def _nonfinite(x) -> bool:
    """Whether a tensor, or a tuple/list/dict of them, holds inf or NaN. On detached tensors: a check that
    autograd recorded would save tensors in a checkpointed forward but not in its recompute."""
    values = x.values() if hasattr(x, "values") and not torch.is_tensor(x) else x
    tensors = [x] if torch.is_tensor(x) else [t for t in values if torch.is_tensor(t)] if isinstance(
        values, (tuple, list, type({}.values()))) else []
    return any(t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()) for t in tensors)


def non_finite_probe(model, batches: list[dict]):
    """The --diagnose callback (a function so that the driver does not import transformers)."""
    from transformers import TrainerCallback

    class NonFiniteProbe(TrainerCallback):
        """--diagnose: prints a DIAG line per step (loss, grad norm, weights finite) and, at the first step
        with a non-finite loss or gradient, where it starts: the first module (in call order) whose forward
        output is non-finite, the trainable parameters whose gradient arrived non-finite (before clipping,
        in backward order), and each row of that batch alone, with its logits checked."""

        def __init__(self, model, batches: list[dict]):
            self.model, self.batches, self.reported = model, batches, False
            self.first_module: str | None = None
            self.bad_grads: list[str] = []
            self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
            for name, module in model.named_modules():
                module.register_forward_hook(self._forward_hook(name))
            for name, p in self.params.items():
                p.register_post_accumulate_grad_hook(self._grad_hook(name))

        def _forward_hook(self, name: str):
            def hook(module, inputs, output):
                if self.first_module is None and _nonfinite(output):
                    self.first_module = f"{name} ({type(module).__name__}; inputs non-finite: {_nonfinite(inputs)})"
            return hook

        def _grad_hook(self, name: str):
            def hook(p):
                if not bool(torch.isfinite(p.grad).all()):
                    self.bad_grads.append(name)
            return hook

        def on_step_begin(self, args, state, control, **kw):
            self.first_module, self.bad_grads = None, []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                print(f"DIAG step {state.global_step} logged: loss {logs.get('loss')}, grad_norm {logs.get('grad_norm')}",
                      file=sys.stderr, flush=True)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            step = state.global_step  # 0-based index of the batch being trained (incremented after the update)
            weights_ok = all(bool(torch.isfinite(p).all()) for p in self.params.values())
            print(f"DIAG step {step + 1}: first non-finite forward output: {self.first_module}; "
                  f"{len(self.bad_grads)} non-finite grads (first in backward order: {self.bad_grads[:4]}); "
                  f"trainable weights finite before this update: {weights_ok}", file=sys.stderr, flush=True)
            if (self.first_module or self.bad_grads) and not self.reported:
                self.reported = True
                self.rows(self.batches[step], step)

        def rows(self, b: dict, step: int) -> None:
            """Each row of the batch alone, with full logits (unsloth reads UNSLOTH_RETURN_LOGITS per call)."""
            import os

            os.environ["UNSLOTH_RETURN_LOGITS"] = "1"
            device = next(self.model.parameters()).device
            try:
                for i in range(len(b["input_ids"])):
                    keep = b["attention_mask"][i].bool()
                    ids = b["input_ids"][i][keep][None].to(device)
                    self.first_module = None
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                        out = self.model(input_ids=ids, labels=b["labels"][i][keep][None].to(device))
                    logits = getattr(out, "logits", None)
                    print(f"DIAG step {step + 1} row {i} alone ({ids.shape[1]} tokens, ids {int(ids.min())}..{int(ids.max())}): "
                          f"loss {float(out.loss):.4f}, logits non-finite: {logits is not None and _nonfinite(logits)}, "
                          f"first non-finite forward output: {self.first_module}", file=sys.stderr, flush=True)
            finally:
                os.environ.pop("UNSLOTH_RETURN_LOGITS")
            self.first_module = None

    return NonFiniteProbe(model, batches)


def our_config(model_dir: str, overrides: list[str], seq: int):
    """Our side's config: the HF recipe's settings, then the run's overrides."""
    from finetune.run import compose

    return compose([
        f"model.name_or_path={model_dir}", "quant=nf4", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
        f"lora.dropout={LORA_DROPOUT}", "lora.target_modules=[all-linear]", f"train.optimizer={OPTIM}",
        f"train.lr={LR}", "train.lr_scheduler=constant", "train.warmup_steps=0", "train.warmup_ratio=0", "train.max_steps=100000",
        "train.grad_accum=1", "train.gradient_checkpointing=true", f"data.max_length={seq}", "output_dir=/tmp/unused",
        *overrides,
    ])


def worker_ours(model_dir: str, batch_sets: list[list[dict]], warmup: int, overrides: list[str], seq: int,
                profile: bool = False, sync_debug: bool = False) -> None:
    """Our side: the model, optimizer and scheduler built as finetune.loop builds them, and each step
    timed through finetune.loop.Steps, which the training loop runs its steps through."""
    from accelerate import Accelerator

    from finetune.loop import build_optimizer, build_scheduler
    from finetune.model import build_model

    cfg = our_config(model_dir, overrides, seq)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision())
    torch.manual_seed(0)
    model, _ = build_model(cfg, model_dir, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    train_each(batch_sets, lambda batches: _train_ours(model, cfg, accelerator, params, optimizer, scheduler, batches,
                                                       warmup, profile, sync_debug))


def compile_each_width(model, cfg, batches: list[dict]) -> dict:
    """A forward and backward (no update) on one batch of each width, so that the timed steps of
    variable-length rows do not include the compile of their width (compiled blocks compile once per
    width; a training run pays that when a width first appears). Twice with CUDA graphs: the first
    call runs the graph once uncaptured, the second records it."""
    from finetune.loss import causal_lm_loss_sum

    start = time.perf_counter()
    by_width = {b["input_ids"].shape[1]: b for b in batches}
    for b in [b for b in by_width.values() for _ in range(2 if cfg.speed.cuda_graphs else 1)]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            causal_lm_loss_sum(model, {k: v.cuda() for k, v in b.items()}, cfg.speed.loss_chunk_size,
                               cfg.speed.compile).backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"widths": len(by_width), "compile_s": round(time.perf_counter() - start)}


class SyncSites:
    """Where the host waits for the GPU while on: torch.cuda.set_sync_debug_mode("warn") warns at each
    synchronizing CUDA call (a prototype in torch: it does not see every kind of wait), and each warning
    is counted under its call site, the innermost frames outside torch itself."""

    FRAMES = 4

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._warnings = self._show = None

    def _note(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f"{os.sep}torch{os.sep}" not in f.filename and f"{os.sep}warnings.py" not in f.filename]
            site = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-self.FRAMES:]))
            self.counts[site] = self.counts.get(site, 0) + 1
        else:
            self._show(message, category, filename, lineno, file, line)

    def start(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        self._show, warnings.showwarning = warnings.showwarning, self._note  # catch_warnings puts it back
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> list[tuple[int, str]]:
        """(waits, call site), the most frequent first."""
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(None, None, None)
        return sorted(((n, site) for site, n in self.counts.items()), reverse=True)


def _train_ours(model, cfg, accelerator, params, optimizer, scheduler, batches: list[dict], warmup: int,
                profile: bool, sync_debug: bool = False) -> dict:
    from finetune.loop import Steps

    accum = cfg.train.grad_accum
    times, losses, tokens = [], [], []
    power = GpuPower()
    warm = compile_each_width(model, cfg, batches) if cfg.speed.compile else {}
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity, schedule
        from torch.profiler import profile as torch_profile

        profiler = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                 schedule=schedule(wait=0, warmup=warmup, active=2, repeat=1))
        profiler.start()

    def record(outcome) -> None:
        times.append(outcome.seconds)
        losses.append(outcome.loss)
        tokens.append(outcome.tokens)
        power.read()
        if profiler is not None:
            profiler.step()

    # back to back, as the training loop runs them: each step's numbers read once the next is queued
    steps = Steps(model, optimizer, scheduler, accelerator=accelerator, params=params, speed=cfg.speed,
                  max_grad_norm=cfg.train.max_grad_norm)
    sync_sites = SyncSites() if sync_debug else None
    torch.cuda.synchronize()
    for i in range(0, len(batches) - accum + 1, accum):
        if sync_sites is not None and i == warmup * accum:
            sync_sites.start()
        earlier = steps.queue(batches[i:i + accum])
        if earlier is not None:
            record(earlier)
    if steps.pending is not None:
        record(steps.finish())
    syncs = sync_sites.stop() if sync_sites is not None else None
    if profiler is not None:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90),
              file=sys.stderr, flush=True)
        print(gpu_busy(profiler, os.environ.get("FINETUNE_BENCH_TRACE")), file=sys.stderr, flush=True)
    from torch._dynamo.utils import counters

    # So a run shows that its blocks ran compiled (past dynamo's recompile limit they run eagerly) and
    # whether Inductor had to skip CUDA graphs for some (speed.cuda_graphs).
    compiled = {"graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                **warm}
    return {"step_seconds": times, "losses": losses, "step_tokens": tokens, "compiled": compiled,
            **({"syncs": syncs} if syncs is not None else {}),
            **power.summary(warmup)}


class GpuPower:
    """The GPU's energy counter, SM clock and power draw through NVML (nvidia-ml-py), read as each step is
    read, and its power limit: an H200 trains our steps at its power limit with the clock lowered, the
    HF recipe's below it at full clock (docs/decisions.md), so a side's speed is also its energy per
    token. Reads nothing without nvidia-ml-py or where NVML lacks a counter."""

    def __init__(self):
        self.readings: list[tuple[float, int, int, float]] = []  # (seconds, energy mJ, SM MHz, W)
        self.handle = None
        try:
            import pynvml  # nvidia-ml-py, which torch.cuda reads clocks and power through
        except ModuleNotFoundError:
            return
        try:
            handle = torch.cuda._get_pynvml_handler()
            self.limit_watts = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except (pynvml.NVMLError, RuntimeError):  # no driver, or a counter this GPU does not give
            return
        self.handle = handle

    def read(self) -> None:
        if self.handle is not None:
            import pynvml

            self.readings.append((time.perf_counter(), pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle),
                                  torch.cuda.clock_rate(), torch.cuda.power_draw() / 1e3))

    def summary(self, warmup: int) -> dict:
        """Mean power and SM clock from the read of the last warm-up step to the last read (the timed
        steps), the limit, and the per-step readings; {} without readings."""
        if len(self.readings) <= warmup or warmup < 1:
            return {}
        (start, energy_start, *_), (end, energy_end, *_) = self.readings[warmup - 1], self.readings[-1]
        timed = self.readings[warmup:]
        return {"power": {"mean_watts": (energy_end - energy_start) / 1e3 / (end - start),
                          "mean_mhz": sum(r[2] for r in timed) / len(timed), "limit_watts": self.limit_watts,
                          "joules": (energy_end - energy_start) / 1e3,
                          "per_step": [(mhz, watts) for _, _, mhz, watts in self.readings]}}


def gpu_busy(profiler, trace_path: str | None) -> str:
    """How much of the profiled steps' wall time the GPU spent running kernels and copies (the union of
    their intervals): what CUDA graphs or fewer syncs could still win is the rest. The Chrome trace is
    kept at `trace_path` when given (FINETUNE_BENCH_TRACE; scripts/trace_summary.py reads it back)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = trace_path or str(Path(scratch) / "trace.json")
        profiler.export_chrome_trace(path)
        return busy_line(json.loads(Path(path).read_text())["traceEvents"])


def busy_line(events: list[dict]) -> str:
    """'GPU busy X ms of Y ms over N profiled steps, K kernels' from a profiler trace's events."""
    # each step is annotated twice, on the host and on the GPU's timeline: the host's spans the step
    steps = [e for e in events
             if e.get("name", "").startswith("ProfilerStep#") and e.get("cat") == "user_annotation"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    kernels = sum(1 for e in events if e.get("cat") == "kernel" and e.get("ph") == "X")
    start, end = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    busy, reach = 0.0, start
    for a, b in gpu:
        a, b = max(a, reach), min(b, end)
        if b > a:
            busy, reach = busy + b - a, b
    return (f"GPU busy {busy / 1e3:,.1f} ms of {(end - start) / 1e3:,.1f} ms over {len(steps)} profiled steps, "
            f"{kernels:,} kernels")


def run_worker(args) -> None:
    if args.worker == "unsloth":
        if args.peer_import_late:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        import unsloth  # noqa: F401  (before transformers, peft and trl, which it patches as it imports)

    from finetune.speed import batch_widths

    if args.gpu_memory_gib:
        # a smaller card: the caching allocator refuses to hold more than this
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gib * 2**30 / torch.cuda.mem_get_info()[1])
    cfg = our_config(args.model_dir, args.override, args.seq)
    packing = args.worker == "ours" and cfg.data.packing
    if args.max_seq:
        # one set per length, longest last: a row of fresh full-length examples per step
        batch_sets = [make_batches(make_examples(args.max_seq_steps * args.batch, seq, seq), args.batch, seq, False)
                      for seq in args.max_seq]
    else:
        # our side pads batch widths as finetune.loop does (compiled: speed.width_buckets widths; packed
        # rows or CUDA graphs: --seq); the HF side pads each batch to its longest row, as its collator does
        widths = batch_widths(cfg.speed, packing, args.seq) if args.worker == "ours" else None
        batch_sets = [make_batches(torch.load(args.rows), args.batch, args.seq, packing, widths)]
    # each set's result goes to stdout as it is done (train_each)
    if args.worker == "ours":
        worker_ours(args.model_dir, batch_sets, args.warmup, args.override, args.seq, args.profile, args.sync_debug)
    else:
        longest = max(args.max_seq or [args.seq])  # unsloth sizes its RoPE cache for max_seq_length
        worker_trainer(args.worker, args.model_dir, batch_sets, args.batch, longest, args.warmup, args.diagnose,
                       args.unsloth_trainer_checkpointing, args.trainer_lr, args.trainer_optim)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run_side(side: str, cmd: list[str], peer_env: dict[str, str] | None, sets: int,
             merge: bool = False) -> tuple[subprocess.CompletedProcess, list]:
    """Run one side's worker, with `peer_env` added to a peer side's environment (see peer_environment).
    Returns the process and the SET results it printed; prints the end of its stderr when it failed.
    `merge` sends stderr into stdout, so that messages keep their order."""
    env = dict(os.environ) | (peer_env or {})
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                          text=True, env=env)
    per_set = [json.loads(ln[len("SET "):]) for ln in proc.stdout.splitlines() if ln.startswith("SET ")]
    if proc.returncode != 0:
        print(f"--- {side} failed (exit {proc.returncode}) after {len(per_set)} of {sets} runs ---\n"
              f"{(proc.stderr or proc.stdout)[-4000:]}", flush=True)
    return proc, per_set


def peer_environment(peer_site: str, extra: list[str]) -> dict[str, str]:
    """A peer side's environment: its packages first on PYTHONPATH (the peers pin older datasets and trl
    than this project's, so only their process sees those), no hub look-ups or usage statistics (the
    GPU machine has no internet), then the --peer-env settings."""
    env = {"PYTHONPATH": os.pathsep.join([peer_site, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    return env | dict(kv.split("=", 1) for kv in extra)


# a peer's own messages worth seeing next to a non-finite loss: mode switches after the first steps
PEER_NOTES = ("STEP ", "DIAG", "Unsloth", "unsloth", "double buffer", "eager", "recompil", "nan", "NaN")


def peer_notes(output: str, limit: int = 80) -> str:
    """The step markers and the peer's messages among `output`'s lines (at most `limit`, the first ones)."""
    return "\n".join([ln[:300] for ln in output.splitlines() if any(k in ln for k in PEER_NOTES)][:limit])


def loss_agreement(r: dict, hf: dict, warmup: int) -> str:
    """Per-step |loss - loss_hf| of side `r` against the HF recipe's run. NaN-aware: a non-finite loss on
    either side makes the worst difference NaN (max() would skip it)."""
    diffs = [abs(a - b) for a, b in zip(hf["losses"], r["losses"])]
    timed = diffs[warmup:]
    worst = lambda xs: max(xs) if xs and all(map(math.isfinite, xs)) else math.nan  # noqa: E731
    return (f"per-step |loss - loss_hf| max {worst(diffs):.4f}, mean {sum(diffs) / max(len(diffs), 1):.4f} over "
            f"{len(diffs)} steps; max |loss - loss_hf| over the timed steps {worst(timed):.4f}")


def report_max_seq(side: str, batch: int, per_set: list[dict]) -> None:
    trained = [r for r in per_set if not r.get("oom")]
    for r in per_set:
        if r.get("oom"):
            print(f"{side}: seq {r['seq']:,} x batch {batch}: out of GPU memory", flush=True)
        else:
            print(f"{side}: seq {r['seq']:,} x batch {batch}: trained, peak {r['peak_gib']:.2f} GiB, last step "
                  f"{r['step_tokens'][-1] / r['step_seconds'][-1]:,.0f} tokens/s, losses "
                  f"{' '.join(f'{x:.3f}' for x in r['losses'])}", flush=True)
    longest = f"{trained[-1]['seq']:,}" if trained else "none of those tried"
    print(f"{side}: longest sequence trained: {longest}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="bloom-1b7")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-len", type=int, default=0,
                   help="examples of lengths uniform in [min-len, seq] instead of full rows (try data.packing=true)")
    p.add_argument("--sides", default="hf,ours",
                   help=f"comma-separated, of hf, ours and the peers {', '.join(PEER_SIDES)} (they need --peer-site)")
    p.add_argument("--peer-site", default=os.environ.get("FINETUNE_PEER_SITE", "/tmp/peers"),
                   help="folder of the peers' packages (unsloth, liger-kernel and their pins), put first on "
                        "PYTHONPATH for the peer sides only (default: $FINETUNE_PEER_SITE or /tmp/peers)")
    p.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment setting for the peer sides' workers (e.g. UNSLOTH_DISABLE_DOUBLE_BUFFER=1)")
    p.add_argument("--unsloth-trainer-checkpointing", action="store_true",
                   help="turn the Trainer's gradient checkpointing on for unsloth as well, around its own")
    p.add_argument("--peer-import-late", action="store_true",
                   help="import transformers and peft before unsloth (it then warns that it misses patches)")
    p.add_argument("--trainer-lr", type=float, default=LR, help=f"the Trainer sides' learning rate (default {LR})")
    p.add_argument("--trainer-optim", default=OPTIM,
                   help=f"the Trainer sides' optim (default the HF recipe's {OPTIM}; unsloth's recipes "
                        "use adamw_8bit)")
    p.add_argument("--ids", choices=["zipf", "uniform"], default="zipf",
                   help="token ids: Zipf over 1,024 ids (default), or uniform over the whole vocabulary")
    p.add_argument("--diagnose", action="store_true",
                   help="when a peer side's losses are not all finite, run it again with probes that print "
                        "where the first non-finite value appears (DIAG lines)")
    p.add_argument("--override", action="append", default=[], help="a finetune config override for our side")
    p.add_argument("--variant", action="append", default=[],
                   help="LABEL=key=value,key=value: one more run of our side with these overrides")
    p.add_argument("--cache", default="/tmp/finetune-bench")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of two of our steps")
    p.add_argument("--sync-debug", action="store_true",
                   help="list where our timed steps make the host wait for the GPU, by call site "
                        "(torch.cuda.set_sync_debug_mode; its warnings slow the steps: their timings do not count)")
    p.add_argument("--max-seq", type=lambda v: [int(x) for x in v.split(",")],
                   help="comma-separated lengths, ascending: train --max-seq-steps steps at each (batch --batch) "
                        "until one runs out of GPU memory, and report the longest that trained")
    p.add_argument("--max-seq-steps", type=int, default=2, help="steps at each --max-seq length")
    p.add_argument("--gpu-memory-gib", type=float, default=0,
                   help="cap each side's GPU memory at this many GiB (a smaller card; compare "
                        "`python -m finetune.footprint ... longest_in=GiB`)")
    p.add_argument("--worker", choices=["hf", "ours", *PEER_SIDES], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    sides = [side for side in args.sides.split(",") if side]
    unknown = [side for side in sides if side not in ("hf", "ours", *PEER_SIDES)]
    if unknown:
        p.error(f"--sides: unknown side(s) {', '.join(unknown)}; choose from hf, ours, {', '.join(PEER_SIDES)}")
    bad_env = [kv for kv in args.peer_env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad_env:
        p.error(f"--peer-env takes KEY=VALUE; got {', '.join(map(repr, bad_env))}")
    if any(side in PEER_SIDES for side in sides) and not Path(args.peer_site).is_dir():
        p.error(f"--peer-site {args.peer_site} is not a folder; install the peers' wheels there first: python3 -m pip "
                f"install -q --no-index --no-deps --no-compile --target {args.peer_site} .peerwhl/*.whl")

    from transformers import AutoConfig

    cache = Path(args.cache)
    model_dir = build_random_model(args.shape, cache / args.shape)
    config = AutoConfig.from_pretrained(model_dir)
    rows_file = cache / f"examples-{args.shape}-{args.batch}x{args.seq}-{args.min_len}-{args.ids}.pt"
    min_len = args.min_len or args.seq
    uniform_over = config.vocab_size if args.ids == "uniform" else 0
    torch.save(make_examples((args.warmup + args.steps) * args.batch, args.seq, min_len, uniform_over=uniform_over),
               rows_file)
    fpt, n_matmul = flops_per_token(config, args.seq)
    # Without recompute a step does 4N per token and three of the four attention passes.
    fpt_no_recompute = 4 * n_matmul + 0.75 * (fpt - 6 * n_matmul)
    peak_tflops = measure_bf16_tflops()
    print(f"shape {args.shape}: {n_matmul / 1e9:.3f}B matmul params, {fpt / 1e9:.2f} GFLOP/token at seq {args.seq}; "
          f"measured bf16 matmul {peak_tflops:.0f} TFLOP/s -> limit {peak_tflops * 1e12 / fpt:,.0f} tokens/s with every "
          f"block recomputed, {peak_tflops * 1e12 / fpt_no_recompute:,.0f} with none", flush=True)

    runs = [(side, side, args.override) for side in sides]
    for variant in args.variant:
        label, _, overrides = variant.partition("=")
        runs.append((label, "ours", args.override + [o for o in overrides.split(",") if o]))
    results = {}
    for side, worker, overrides in runs:
        cmd = [sys.executable, __file__, "--worker", worker, "--model-dir", str(model_dir), "--rows", str(rows_file),
               "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup)]
        cmd += [f"--override={o}" for o in overrides] + (["--profile"] if args.profile else [])
        cmd += ["--sync-debug"] if args.sync_debug and worker == "ours" else []
        cmd += ["--unsloth-trainer-checkpointing"] if args.unsloth_trainer_checkpointing else []
        cmd += ["--peer-import-late"] if args.peer_import_late else []
        cmd += [f"--trainer-lr={args.trainer_lr}", f"--trainer-optim={args.trainer_optim}"] if worker != "ours" else []
        cmd += [f"--gpu-memory-gib={args.gpu_memory_gib}"] if args.gpu_memory_gib else []
        cmd += [f"--max-seq={','.join(map(str, args.max_seq))}", f"--max-seq-steps={args.max_seq_steps}"] \
            if args.max_seq else []
        peer_env = peer_environment(args.peer_site, args.peer_env) if worker in PEER_SIDES else None
        proc, per_set = run_side(side, cmd, peer_env, len(args.max_seq or [1]))
        if args.profile and worker == "ours":
            print(proc.stderr[proc.stderr.find("Name"):][-16000:] if "Name" in proc.stderr else "", flush=True)
        if not per_set:
            continue
        if args.max_seq:
            report_max_seq(side, args.batch, per_set)
            continue
        r = per_set[0]
        if r.get("oom"):
            print(f"--- {side} ran out of GPU memory ---", flush=True)
            continue
        # real (non-padding) tokens over the timed steps after warm-up
        r["tokens_per_s"] = sum(r["step_tokens"][args.warmup:]) / sum(r["step_seconds"][args.warmup:])
        r["mfu"] = r["tokens_per_s"] * fpt / (peak_tflops * 1e12)
        results[side] = r
        # as each side finishes, so a run cut short still shows what it measured
        compiled = "".join(f", {k} {v}" for k, v in r.get("compiled", {}).items())
        agreement = f"; {loss_agreement(r, results['hf'], args.warmup)}" if "hf" in results and side != "hf" else ""
        print(f"{side}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB, MFU {100 * r['mfu']:.1f}%"
              f"{compiled}, losses {' '.join(f'{x:.3f}' for x in r['losses'])}{agreement}; step ms "
              f"{' '.join(f'{1e3 * x:.0f}' for x in r['step_seconds'])}", flush=True)
        if "power" in r:
            power = r["power"]
            print(f"{side}: {power['mean_watts']:.0f} W at {power['mean_mhz']:.0f} MHz (SM clock) over the timed steps, "
                  f"power limit {power['limit_watts']:.0f} W: {1e3 * power['joules'] / sum(r['step_tokens'][args.warmup:]):.1f} "
                  f"mJ per token; SM MHz/W as each step was read: "
                  + " ".join(f"{mhz}/{watts:.0f}" for mhz, watts in power["per_step"]), flush=True)
        if "syncs" in r:
            print(f"{side}: {sum(n for n, _ in r['syncs'])} host waits for the GPU in "
                  f"{len(r['step_seconds']) - args.warmup} timed steps, by call site:"
                  + "".join(f"\n  {n} x {site}" for n, site in r["syncs"]), flush=True)
        finite = [math.isfinite(x) for x in r["losses"] + r.get("grad_norms", [])]
        if worker in PEER_SIDES and not all(finite):
            print(f"--- {side}: non-finite values; grad norms "
                  f"{' '.join(f'{x:.3g}' for x in r['grad_norms'])}; its messages by step: ---\n"
                  f"{peer_notes(proc.stderr)}", flush=True)
            if args.diagnose:
                print(f"--- {side}: running it again with probes (--diagnose) ---", flush=True)
                proc, _ = run_side(f"{side} --diagnose", cmd + ["--diagnose"], peer_env, 1, merge=True)
                print(peer_notes(proc.stdout, limit=200), flush=True)

    if args.max_seq:
        return
    print(f"\n| {args.shape} b{args.batch} s{args.seq} | tokens/s | peak GiB | MFU | loss step 1 | "
          f"loss last 3 (mean) |\n|---|---|---|---|---|---|")
    for side, r in results.items():
        last = r["losses"][-3:]
        print(f"| {side} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {100 * r['mfu']:.1f}% | "
              f"{r['losses'][0]:.4f} | {sum(last) / len(last):.4f} |")
    if "hf" in results:
        hf = results["hf"]
        print("\nlosses hf:", " ".join(f"{x:.3f}" for x in hf["losses"]))
        for side, r in results.items():
            if side == "hf":
                continue
            print(f"{side} / hf: {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s, "
                  f"{r['peak_gib'] / hf['peak_gib']:.2f}x peak memory; {loss_agreement(r, hf, args.warmup)}")
            print(f"losses {side}:", " ".join(f"{x:.3f}" for x in r["losses"]))


if __name__ == "__main__":
    main()
