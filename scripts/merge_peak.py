"""Peak memory and time of `python -m finetune.merge` on a model shape with random weights (no hub needed).

    python scripts/merge_peak.py --shape llama3-8b [--cache /tmp/finetune-bench] [--base dequantized|original|both]
    python scripts/merge_peak.py --shape llama3-8b --train-only          # model and adapter only (a first call)
    python scripts/merge_peak.py --shape tiny-llama --device cpu        # a quick check on the CPU

Builds (or reuses: the same CACHE/SHAPE folder as scripts/bench.py) the shape's random-weight bf16
folder with bench.py's build_random_model, saves the offline tokenizer of finetune.tiny, trains a LoRA adapter on every linear layer for 2 steps
through the real CLI on a few short rows (reused when its adapter exists), then runs
`python -m finetune.merge adapter=RUN out=DIR base=dequantized` as a subprocess and prints the
shape's parameter count, the merged folder's size, the merge's peak RSS (its own, and the kernel's
figure for the subprocess), peak GPU memory, time and the parity report. --base both merges with
base=original too. Merged folders are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SHAPES  # noqa: E402

ROWS = [
    ("What is the capital of France?", "Paris."), ("Name a primary color.", "Red."),
    ("What is 2 plus 3?", "5."), ("Say hello.", "Hello!"), ("What is the opposite of hot?", "Cold."),
    ("Count to three.", "1, 2, 3."), ("What animal barks?", "A dog."), ("What is ice made of?", "Water."),
    ("Name a planet.", "Mars."), ("What color is the sky?", "Blue."), ("What is 10 minus 4?", "6."),
    ("Spell cat.", "C-A-T."), ("What do bees make?", "Honey."), ("Which is larger, 3 or 7?", "7."),
    ("What is the first month?", "January."), ("What do plants need?", "Light and water."),
]


def parameter_count(folder: Path) -> int:
    """Elements of every tensor in the folder's safetensors files (read from their headers)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_folder(shape: str, cache: Path) -> tuple[Path, Path]:
    """The shape's random bf16 weights (bench.py's folder) and the offline tokenizer's folder."""
    from finetune.tiny import build_tiny_tokenizer

    folder, tokenizer = cache / shape, cache / "merge_peak_tokenizer"
    started = time.perf_counter()
    if not (folder / "config.json").exists():
        # In a child process: Linux carries a process's peak RSS across fork and exec, so the merge
        # subprocess would report this process's peak (the whole model, built in memory) as its own.
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from bench import build_random_model; build_random_model(sys.argv[2], Path(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), shape, str(folder)], check=True)
    if not (tokenizer / "tokenizer.json").exists():
        build_tiny_tokenizer().save_pretrained(tokenizer)
    print(f"[merge_peak] model {folder} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, tokenizer


def trained_run(model: Path, tokenizer: Path, cache: Path, shape: str) -> Path:
    """A 2-step LoRA run (all linear layers, NF4) of the real CLI; reused when its adapter exists."""
    run = cache / f"{shape}-run"
    if (run / "adapter" / "adapter_model.safetensors").exists():
        print(f"[merge_peak] reusing the run {run}", flush=True)
        return run
    shutil.rmtree(run, ignore_errors=True)
    data = cache / "merge_peak_rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in ROWS))
    cmd = [
        sys.executable, "-m", "finetune", f"model.name_or_path={model}", f"model.tokenizer={tokenizer}", f"data.path={data}", "data.format=instruction",
        "data.eval_fraction=0.25", "data.max_length=64", "lora.target_modules=[all-linear]", "train.max_steps=2",
        "train.batch_size=4", "train.grad_accum=1", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
        "train.lr=1e-3", "log.wandb=false", "sample.prompts=[]", f"output_dir={run}",
    ]
    print("+", " ".join(cmd), flush=True)
    started = time.perf_counter()
    if subprocess.call(cmd) != 0:
        raise SystemExit("[merge_peak] training failed; see above")
    print(f"[merge_peak] trained in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def merge(run: Path, out: Path, base: str, device: str) -> dict:
    """Run the merge CLI; returns its figures (parity.json's resources) and the kernel's peak RSS of it."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "finetune.merge", f"adapter={run}", f"out={out}", f"base={base}", f"device={device}"]
    print("+", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"[merge_peak] the merge exited {proc.returncode}; see above")
    report = json.loads((out / "parity.json").read_text())
    return {"report": report, "wall_s": wall, "child_maxrss_gib": usage.ru_maxrss / 2**20,
            "bytes": folder_bytes(out), "out": out}


def summary(shape: str, params: int, base: str, m: dict) -> list[str]:
    r = m["report"]["resources"]
    gpu = lambda v: "-" if v is None else f"{v:.2f} GiB"  # noqa: E731
    lines = [
        f"== {shape} ({params:,} parameters), base={base}, device {r['device']}",
        f"merged folder     {m['bytes'] / 2**20:,.1f} MiB ({m['out']})",
        f"merge phase       {r['merge_seconds']:.1f} s; peak RSS {r['merge_peak_rss_gib']:.2f} GiB; peak GPU {gpu(r['merge_peak_gpu_gib'])}",
        f"whole command     {m['wall_s']:.1f} s wall ({r['seconds']:.1f} s inside); peak RSS {r['peak_rss_gib']:.2f} GiB "
        f"(kernel's ru_maxrss of the subprocess {m['child_maxrss_gib']:.2f} GiB); peak GPU {gpu(r['peak_gpu_gib'])}",
    ]
    for name, c in m["report"].get("comparisons", {}).items():
        lines.append(f"  {name:<62} max|dlogit| {c['max_abs_logit_diff']:.4f}  KL {c['kl']:.2e}  top-1 {c['top1_agreement']:.1%}")
    lines.append("  parity: " + ("OK" if not m["report"].get("failures") else "FAILED " + "; ".join(m["report"]["failures"])))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--cache", type=Path, default=Path("/tmp/finetune-bench"))
    p.add_argument("--device", default="auto", help="the merge's device= (auto, cpu, cuda, cuda:N)")
    p.add_argument("--base", choices=["dequantized", "original", "both"], default="dequantized")
    p.add_argument("--train-only", action="store_true", help="build the model and train the adapter, merge nothing")
    p.add_argument("--keep", action="store_true", help="keep the merged folders")
    args = p.parse_args()
    if SHAPES[args.shape].get("model_type") != "llama":
        p.error(f"--shape {args.shape} is not a llama shape; use one of "
                f"{', '.join(s for s, a in SHAPES.items() if a.get('model_type') == 'llama')}")
    args.cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer = model_folder(args.shape, args.cache)
    params = parameter_count(model)
    run = trained_run(model, tokenizer, args.cache, args.shape)
    if args.train_only:
        return 0
    lines = []
    for base in ["dequantized", "original"] if args.base == "both" else [args.base]:
        m = merge(run, args.cache / f"{args.shape}-merged-{base}", base, args.device)
        lines += summary(args.shape, params, base, m)
        if not args.keep:
            shutil.rmtree(m["out"])
    print("\n".join(["=" * 30 + " merge_peak " + "=" * 30, *lines]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
