"""Shared fixtures: tiny random-weight models with a real trained tokenizer, data files, a CLI runner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# speed.fused_lora's Triton kernels run on the CPU in Triton's interpreter (tests/test_fused_lora.py); it
# is chosen when triton is first imported, which bitsandbytes does.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402

from finetune.tiny import TINY_ARCHITECTURES, build_tiny_tokenizer, save_random_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTION_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(6) for b in range(6)
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny_llama"), TINY_ARCHITECTURES["llama"], tokenizer)


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory, tokenizer) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny_bloom"), TINY_ARCHITECTURES["bloom"], tokenizer)


@pytest.fixture(scope="session")
def instruction_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTION_ROWS))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_run_args(model_dir: Path, data_file: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a short, quiet run of the real CLI on a tiny model."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.path={data_file}",
        "data.format=instruction",
        "data.eval_fraction=0.2",
        "data.max_length=64",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "log.wandb=false",
        "sample.prompts=[]",
        f"output_dir={out}",
        *extra,
    ]


def cli_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "FINETUNE_CACHE": str(cache_dir), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_cli(args: list[str], cache_dir: Path, module: str = "finetune", timeout: int = 600,
            **popen_kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True,
        timeout=timeout, **popen_kwargs,
    )


class LiveCli:
    """The real CLI running in the background, its output collected as it comes (for signals and kills)."""

    def __init__(self, args: list[str], cache_dir: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune", *args], cwd=ROOT, env=cli_env(cache_dir),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, chunks: list[bytes]) -> None:
        # read1 returns as soon as anything arrives: tqdm redraws its bar with \r, never a newline.
        while chunk := stream.read1(4096):
            chunks.append(chunk)

    @property
    def stdout(self) -> str:
        return b"".join(self._out).decode(errors="replace")

    @property
    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def steps_done(self) -> int:
        """The last step the progress bar reported as done (0 before the first)."""
        done = re.findall(r"training: +\d+%\|[^|]*\| *(\d+)/\d+ \[", self.stderr)
        return int(done[-1]) if done else 0

    def wait_until(self, condition, timeout: float = 300, poll: float = 0.0005) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.process.returncode}) before the awaited moment:\n"
                                     + self.stderr[-3000:])
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("timed out waiting for the run:\n" + self.stderr[-3000:])
            time.sleep(poll)

    def wait(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


@pytest.fixture
def fresh_accelerate_state():
    # Each in-process run creates an Accelerator; the state is a process-wide singleton.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture
def fresh_compile_cache():
    """Forget earlier tests' compiles: they count towards dynamo's recompile limit for the same block
    code, past which blocks would run eagerly and a compiled-path test would test eager code. The
    limits compile_blocks raises are put back afterwards, so a later test meets the default ones."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limits = {k: getattr(torch._dynamo.config, k) for k in ("recompile_limit", "accumulated_recompile_limit")}
    with torch._dynamo.config.patch(limits):
        yield


def lora_model(model_dir: Path, *overrides: str):
    """The real NF4 base with LoRA adapters, on the CPU, every adapter non-zero (no dropout)."""
    from finetune.model import build_model
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={model_dir}", "output_dir=/tmp/unused", "lora.dropout=0.0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, str(model_dir), torch.device("cpu"))[0]
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make every adapter matter
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch: dict, chunk_size: int = 0, autocast: bool = False, compiled_loss: bool = False):
    """The loss sum of `batch` and every parameter's gradient from it."""
    from finetune.loss import causal_lm_loss_sum

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss_sum(model, batch, chunk_size, compiled_loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
