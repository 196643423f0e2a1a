"""Footprint, training peak, throughput and loss of one recipe in every quantization mode, as a table.

    python scripts/quant_table.py [recipe=NAME] [key=value ...] [modes=nf4,fp4,int8,none] [steps=K]
        [seq=N] [offload=true] [out=DIR]

For each mode the real CLI (`python -m finetune ... quant.mode=MODE`) trains K identical steps in a
process of its own, so each mode's peak memory is its own (GPU: torch.cuda.max_memory_allocated;
CPU: the process's peak RSS, which includes Python and the libraries). Its summary.json gives the
footprint (get_memory_footprint), tokens/s, the losses and the peak; finetune.footprint adds the
quantization constants and the estimated peak, for comparison. A markdown table is printed at the end
and written to DIR/quant_table.md.

    seq=N           train on synthetic text rows that all fill exactly N tokens (fixed-shape
                    batches for throughput and memory; losses on it mean little)
    offload=true    (GPU) add a row: int8 with the last third of the layers kept unquantized on
                    the CPU (quant.int8_fp32_cpu_offload + a device_map), to show that a base
                    split between GPU and CPU still trains its adapters

The two tables of the quantization issue (no hub needed):

    # H100, bloom-1b7 shapes with random weights and the offline tokenizer
    python scripts/quant_table.py recipe=bloom_nf4 model.random_init=true steps=20 seq=512 \
        train.batch_size=4 train.grad_accum=1 train.optimizer=adamw offload=true out=runs/quant_table_gpu
    # CPU, the embedded SmolLM2-135M on its terse-answers data
    python scripts/quant_table.py recipe=smollm2_demo steps=20 out=runs/quant_table_cpu
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OWN_KEYS = ("modes", "steps", "seq", "offload", "out")


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own = {"modes": "nf4,fp4,int8,none", "steps": "20", "seq": "", "offload": "false", "out": "runs/quant_table"}
    overrides = []
    for item in argv:
        key, _, value = item.partition("=")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(item)
    return own, overrides


def synthetic_text(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Rows of random words, each long enough to be truncated to data.max_length tokens."""
    vocab = ("the quick brown fox jumps over lazy dog capital of France Paris answer briefly yes no maybe "
             "fine tuning adapts a pretrained language model to new data with low rank adapters").split()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")
    return path


def offload_device_map(cfg, source: str, fraction: float = 1 / 3) -> dict[str, object]:
    """GPU 0 for everything but the last `fraction` of the decoder layers, which go to the CPU."""
    from finetune.source import meta_model

    model = meta_model(source, cfg.model)
    layer_lists = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "ModuleList" and len(m) > 1]
    prefix, layers = layer_lists[0]
    first_cpu = len(layers) - max(1, int(len(layers) * fraction))
    device_map: dict[str, object] = {}
    # remove_duplicate=False: a tied output head needs its own entry too.
    for name, _ in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".")[0])
            device_map[f"{prefix}.{index}"] = "cpu" if index >= first_cpu else 0
        else:
            device_map[name.rsplit(".", 1)[0]] = 0
    return device_map


def hydra_dict(d: dict[str, object]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"


def run_mode(label: str, overrides: list[str], out: Path, env: dict[str, str]) -> dict:
    run_dir = out / label
    args = [sys.executable, "-m", "finetune", *overrides, f"output_dir={run_dir}"]
    started = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / f"{label}.log").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0:
        print(f"[{label}] failed (exit {result.returncode}); last lines of {out / (label + '.log')}:\n"
              + "\n".join(result.stderr.strip().splitlines()[-15:]), flush=True)
        return {"label": label, "failed": True}
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["label"] = label
    print(f"[{label}] done in {time.perf_counter() - started:.0f} s: loss {summary['first_loss']:.4f} -> "
          f"{summary['final_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s, peak "
          f"{summary['peak_memory_gib']:.2f} GiB", flush=True)
    return summary


def main() -> None:
    import torch

    from finetune.footprint import estimate_footprint, estimate_training_peak
    from finetune.run import compose
    from finetune.source import default_cache_dir, resolve_model_source
    from finetune.tiny import build_tiny_tokenizer

    own, overrides = parse(sys.argv[1:])
    out = Path(own["out"])
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in own["modes"].split(",") if m]
    steps = int(own["steps"])
    cuda = torch.cuda.is_available()
    base = list(overrides) + [
        f"train.max_steps={steps}", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
        "log.wandb=false", "sample.prompts=[]",
    ]
    probe = compose(base + ["output_dir=" + str(out / "probe")])
    if probe.model.random_init and not probe.model.tokenizer:
        # No hub: the offline tokenizer of the tests, saved once (ids stay below any model's vocab).
        tokenizer_dir = out / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            build_tiny_tokenizer().save_pretrained(tokenizer_dir)
        base.append(f"model.tokenizer={tokenizer_dir.resolve()}")
    if own["seq"]:
        seq = int(own["seq"])
        data = synthetic_text(out / f"text_{seq}.jsonl", rows=max(400, steps * probe.train.batch_size * 2), words=seq)
        base += [f"data.path={data.resolve()}", "data.format=text", f"data.max_length={seq}",
                 "data.eval_fraction=0.05", "data.eval_split=null"]
    cfg = compose(base + ["output_dir=" + str(out / "probe")])
    source = resolve_model_source(cfg.model, default_cache_dir(), seed=cfg.train.seed)

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    # The unquantized base's footprint, for the ratios, whether or not mode none is run.
    none_fp = estimate_footprint(dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mode="none")), source, "none")
    rows = []
    for mode in modes:
        mode_cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mode=mode))
        fp = estimate_footprint(mode_cfg, source, mode)
        summary = run_mode(mode, base + [f"quant.mode={mode}"], out, env)
        rows.append((mode, fp, estimate_training_peak(mode_cfg, source, fp), summary))
    if own["offload"].lower() in ("1", "true", "yes"):
        if not cuda:
            print("[int8+offload] skipped: it splits the base between a GPU and the CPU, and no GPU is visible")
        else:
            device_map = offload_device_map(cfg, source)
            on_cpu = sorted(k for k, v in device_map.items() if v == "cpu")
            print(f"[int8+offload] on the CPU, unquantized: {', '.join(on_cpu)}", flush=True)
            mode_cfg = dataclasses.replace(cfg, quant=dataclasses.replace(
                cfg.quant, mode="int8", int8_fp32_cpu_offload=True, device_map=device_map))
            fp = estimate_footprint(mode_cfg, source, "int8")
            summary = run_mode("int8+offload", base + ["quant.mode=int8", "quant.int8_fp32_cpu_offload=true",
                                                        f"+quant.device_map={hydra_dict(device_map)}"], out, env)
            rows.append(("int8+offload", fp, estimate_training_peak(mode_cfg, source, fp), summary))

    table = render(cfg, rows, none_fp, steps, cuda)
    (out / "quant_table.md").write_text(table + "\n")
    print("\n" + table, flush=True)


def render(cfg, rows, none, steps: int, cuda: bool) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    peak_kind = "GPU max allocated" if cuda else "process peak RSS"
    head = [
        f"### {cfg.model.name_or_path}{' (random weights)' if cfg.model.random_init else ''} on {device}",
        "",
        f"{steps} identical steps per mode: batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}, "
        f"data.max_length {cfg.data.max_length}, LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, "
        f"lr {cfg.train.lr:g}, {cfg.train.optimizer}, compute {cfg.quant.compute_dtype}, "
        f"gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, seed {cfg.train.seed}.",
        "",
        "| mode | footprint (get_memory_footprint) | + quant constants | vs none | quantized linears vs none "
        f"| peak memory ({peak_kind}) | estimated peak | tokens/s | train loss first -> last | eval loss start -> end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for mode, fp, peak, s in rows:
        ratio = f"{none.total / fp.total:.2f}x smaller"
        linear = f"{fp.linear_bytes_unquantized / fp.quantized_bytes:.2f}x smaller" if fp.quantized_params else "-"
        if s.get("failed"):
            lines.append(f"| {mode} | {fp.weights / 2**20:,.1f} MiB (estimated) | {fp.quant_state / 2**20:,.1f} MiB "
                         f"| {ratio} | {linear} | failed | {peak.total / 2**30:.2f} GiB | - | - | - |")
            continue
        evals = s["eval_loss"]
        ev = f"{evals[0][1]:.4f} -> {evals[-1][1]:.4f}" if evals else "-"
        lines.append(
            f"| {mode} | {s['memory_footprint_bytes'] / 2**20:,.1f} MiB | {fp.quant_state / 2**20:,.1f} MiB | {ratio} "
            f"| {linear} | {s['peak_memory_gib']:.2f} GiB | {peak.total / 2**30:.2f} GiB | {s['tokens_per_s']:,.0f} "
            f"| {s['first_loss']:.4f} -> {s['final_loss']:.4f} | {ev} |"
        )
    notes = [
        "",
        "footprint: measured by the run (get_memory_footprint after loading; parameters and buffers). "
        "quant constants (absmax / SCB, outside get_memory_footprint) and the estimated peak: finetune.footprint. "
        "vs none: (footprint + constants) against the unquantized base; quantized linears: those layers alone.",
    ]
    mismatch = [mode for mode, fp, _, s in rows if not s.get("failed") and s["memory_footprint_bytes"] != fp.weights]
    notes.append("estimated get_memory_footprint equals the measured one for every mode" if not mismatch else
                 "estimated get_memory_footprint differs from the measured one for: " + ", ".join(
                     f"{mode} ({fp.weights:,} vs {s['memory_footprint_bytes']:,} bytes)"
                     for mode, fp, _, s in rows if mode in mismatch))
    return "\n".join(head + lines + notes)


if __name__ == "__main__":
    main()
