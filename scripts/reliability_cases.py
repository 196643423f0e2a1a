"""Bad input and interrupted runs, tried as a new user would, through the real CLI on a tiny model.

    python scripts/reliability_cases.py [--work DIR]

Prints a table: case, exit code, the first line of the message, and whether anything saved was lost
(the files of a finished run compared byte for byte before and after). CPU only, a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".finetune.lock"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None)
    work = Path(p.parse_args().work or tempfile.mkdtemp(prefix="reliability-"))
    sys.path.insert(0, str(ROOT))
    from finetune.tiny import TINY_ARCHITECTURES, save_random_model

    model = save_random_model(work / "model", TINY_ARCHITECTURES["llama"])
    env = {**os.environ, "FINETUNE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    rows = [{"instruction": f"What is {a} times {b}?", "output": f"{a * b}"} for a in range(10) for b in range(10)]
    rows[17]["output"] = a_number = 61  # a JSON number among numeric strings
    rows[18]["output"] = ""  # the one truly empty answer
    numeric = work / "numeric.jsonl"
    numeric.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "bad_utf8.jsonl").write_bytes(b'{"instruction": "hi", "output": "ok"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    (work / "empty.jsonl").write_text("")
    (work / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    (work / "a_file").write_text("not a folder")

    def cli(out: Path, *extra: str, data: Path = numeric) -> subprocess.CompletedProcess:
        args = [f"model.name_or_path={model}", f"data.path={data}", "data.format=instruction", "data.eval_fraction=0.1",
                "data.max_length=64", "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=0",
                "log.wandb=false", "sample.prompts=[]", f"output_dir={out}", *extra]
        return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)

    def message(result: subprocess.CompletedProcess, contains: str = "") -> str:
        """The line a user reads first: the error's first problem, or the stdout line holding `contains`."""
        text = result.stderr if result.returncode else result.stdout
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if contains:
            lines = [ln for ln in lines if contains in ln] or lines
        for i, line in enumerate(lines):
            if "finetune" in line and "error" in line:
                if line.endswith(":") and i + 1 < len(lines):
                    return (line.split(":", 1)[0] + ": " + lines[i + 1].lstrip("- "))[:160]
                return line[:160]
        return (lines[0] if contains else lines[-1] if lines else "")[:160]

    finished = work / "finished"
    first = cli(finished, "train.save_every=1")
    assert first.returncode == 0, first.stderr[-2000:]
    record = snapshot(finished)
    table = []

    def case(name: str, result: subprocess.CompletedProcess, lost: str = "none", contains: str = "") -> None:
        table.append((name, result.returncode, message(result, contains), lost))
        print(f"{name}: exit {result.returncode}", flush=True)

    numeric_out = [ln for ln in first.stdout.splitlines() if "rows read" in ln or "dropped" in ln]
    table.append((f"numbers as answers ({a_number} as a JSON number, numeric strings), one empty", first.returncode,
                  " / ".join(s.strip() for s in numeric_out)[:150], "none (99 of 100 kept, the empty one counted)"))
    case("invalid UTF-8 in the data file", cli(work / "r1", data=work / "bad_utf8.jsonl"))
    case("empty data file", cli(work / "r2", data=work / "empty.jsonl"))
    case("malformed JSON line", cli(work / "r3", data=work / "broken.jsonl"))
    case("lora.r=abc", cli(work / "r4", "lora.r=abc"))
    case("train.lr=fast", cli(work / "r5", "train.lr=fast"))
    case("output_dir is a file", cli(work / "a_file"))
    case("output_dir under a file", cli(work / "a_file" / "run"))
    case("train.learning_rate=1e-3 (another tool's name)", cli(work / "r6", "train.learning_rate=1e-3", "train.max_steps=1"),
         contains="learning_rate")
    case("train.warmup_steps=5 in a 3-step run", cli(work / "r7", "train.warmup_steps=5"), contains="warmup")
    case("other settings into a finished run", cli(finished, "lora.r=8"),
         "none" if snapshot(finished) == record else "CHANGED")
    case("other LoRA settings resumed into a finished run", cli(finished, "lora.r=8", "train.resume=auto",
                                                                 "train.max_steps=5"),
         "none" if snapshot(finished) == record else "CHANGED")
    live = work / "live"
    args = [f"model.name_or_path={model}", f"data.path={numeric}", "data.format=instruction", "data.max_length=64",
            "train.max_steps=8", "train.batch_size=4", "train.warmup_steps=0", "log.wandb=false", "sample.prompts=[]",
            f"output_dir={live}"]
    holder = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while not (live / ".finetune.lock").exists() and holder.poll() is None:
        time.sleep(0.2)
    holder.send_signal(signal.SIGSTOP)  # hold the first run mid-launch, so the second surely meets it alive
    second = cli(live)
    holder.send_signal(signal.SIGCONT)
    holder.communicate(timeout=900)
    from finetune.atomic import verify_directory

    case("a second run into a live run's output_dir", second,
         f"none (the first exits {holder.returncode}, its adapter verifies: {not verify_directory(live / 'adapter')})")
    copy = work / "leftover"
    shutil.copytree(finished, copy)
    (copy / ".adapter.tmp-999999999-0badf00d").mkdir()
    case("a kill -9 during the final adapter write left its staging folder", cli(copy, "train.resume=auto",
                                                                                   "train.max_steps=4"),
         contains="removed")
    corrupt = work / "corrupt"
    shutil.copytree(finished, corrupt)
    shutil.rmtree(corrupt / "adapter")
    with open(corrupt / "checkpoints" / "step-000003" / "optimizer.pt", "ab") as f:
        f.write(b"junk")
    result = cli(corrupt, "train.resume=auto")
    table.append(("train.resume=auto over a corrupt newest checkpoint", result.returncode,
                  next((ln for ln in result.stdout.splitlines() if "skipped" in ln), "")[:150], "none"))
    damaged = work / "damaged"
    shutil.copytree(finished, damaged)
    weights = damaged / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\xff" * 8)
    result = cli(damaged, "train.resume=auto")
    table.append(("finished run whose final adapter is damaged, train.resume=auto", result.returncode,
                  next((ln for ln in result.stdout.splitlines() if "damaged" in ln), "")[:150],
                  "none (the weights rewritten from step 3 equal the original's)"
                  if snapshot(damaged / "adapter")["adapter_model.safetensors"]
                  == snapshot(finished / "adapter")["adapter_model.safetensors"] else "DIFFERENT"))

    print("\n| case | exit | message | data lost |\n|---|---|---|---|")
    for name, code, text, lost in table:
        print(f"| {name} | {code} | {text.replace('|', '/')} | {lost} |")


if __name__ == "__main__":
    main()
