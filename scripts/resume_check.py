"""Does a stopped-and-resumed run give the losses of an uninterrupted one, on this machine's device?

    python scripts/resume_check.py                      # 24 steps, stop after 10, tiny llama
    python scripts/resume_check.py --steps 40 --stop 17 --hidden 512 --layers 4 [overrides...]

Runs the real CLI three times on a random-weight llama built by finetune.tiny (no hub needed) with
LoRA dropout on and grad_accum=2: N steps uninterrupted (twice: the second run measures the
device's own run-to-run noise), then k steps with train.stop_after_steps=k and a resume with
train.resume=auto. Prints the max abs difference of the per-step losses. On the CPU the runs are
bitwise reproducible and every difference must be 0.0; on a GPU, resume should be within the
run-to-run noise (atomics in some CUDA kernels make two identical runs differ slightly).
Extra arguments are passed to every run as config overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.tiny import build_tiny_tokenizer, save_random_model


def launch(args: list[str], label: str) -> None:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{label} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    print(f"  {label}: {time.perf_counter() - started:.0f} s", flush=True)


def losses(run_dir: Path) -> list[list]:
    return json.loads((run_dir / "summary.json").read_text())["losses"]


def max_abs_diff(a: list[list], b: list[list]) -> float:
    if [s for s, _ in a] != [s for s, _ in b]:
        sys.exit(f"the runs logged different steps: {[s for s, _ in a]} vs {[s for s, _ in b]}")
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--stop", type=int, default=10, help="steps before the interruption")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args, overrides = parser.parse_known_args()

    work = Path(tempfile.mkdtemp(prefix="resume_check-"))
    tokenizer = build_tiny_tokenizer()
    arch = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)
    model = save_random_model(work / "model", arch, tokenizer)
    rows = [{"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(10) for b in range(10)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run_args(out: str, *extra: str) -> list[str]:
        return [
            f"model.name_or_path={model}", f"data.path={work / 'data.jsonl'}", "data.format=instruction",
            "data.eval_fraction=0", "data.max_length=64", f"train.max_steps={args.steps}", "train.batch_size=4",
            "train.grad_accum=2", "train.warmup_steps=2", "train.lr=1e-3", "lora.dropout=0.1",
            "train.eval_every=0", "log.wandb=false", "sample.prompts=[]", f"output_dir={work / out}",
            *overrides, *extra,
        ]

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"resume check on {device}: {args.steps} steps, interrupted after {args.stop}; work folder {work}",
          flush=True)
    launch(run_args("straight"), "uninterrupted run")
    launch(run_args("again"), "uninterrupted run, again")
    launch(run_args("resumed", f"train.stop_after_steps={args.stop}"), f"first {args.stop} steps")
    launch(run_args("resumed", "train.resume=auto"), "resumed run")

    straight = losses(work / "straight")
    noise = max_abs_diff(straight, losses(work / "again"))
    resumed = max_abs_diff(straight, losses(work / "resumed"))
    print(json.dumps({"device": device, "steps": args.steps, "stop": args.stop,
                      "max_abs_loss_diff_resumed": resumed, "max_abs_loss_diff_rerun": noise}))
    print(f"max abs per-step loss difference, resumed vs uninterrupted: {resumed!r}")
    print(f"max abs per-step loss difference, two uninterrupted runs:   {noise!r}")


if __name__ == "__main__":
    main()
