"""Several processes for real: the CLI under torchrun, 2 gloo ranks on the CPU, DDP and FSDP2.

Each multi-process run costs about a minute on two cores, so runs are module-scoped and shared by
the asserts that read them. DDP is compared with one process of the same global batch (4 rows x 2
ranks against 8 rows x 1) in float32, where the only difference is the order the all-reduce sums
the two halves in.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.sampler import EpochBatches
from tests.conftest import ROOT, cli_env, run_cli, tiny_run_args

STEPS = 4
COMMON = ("lora.dropout=0", f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_last=5")
FLOAT32 = ("quant.compute_dtype=float32",)  # mixed precision no: per-step losses equal to rounding
FSDP = ("dist=fsdp", "quant.quant_storage=bfloat16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str], ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "finetune", *args]


def torchrun(args: list[str], cache_dir: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    # --standalone picks its own rendezvous port; MASTER_PORT is set too so that two launches in a
    # row never meet a port still held by the previous one.
    env = {**cli_env(cache_dir), "MASTER_PORT": str(_free_port())}
    return subprocess.run(torchrun_command(args, ranks), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _losses(run_dir: Path) -> list[float]:
    """Per-step train losses (steps 1, 2, ... in order) of a finished run."""
    steps = _summary(run_dir)["losses"]
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1))
    return [loss for _, loss in steps]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tiny_llama, instruction_file, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _ok(run_cli(tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FLOAT32, "train.batch_size=8"), cache_dir))
    return out


@pytest.fixture(scope="module")
def ddp(tiny_llama, instruction_file, cache_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _ok(torchrun(tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FLOAT32), cache_dir))
    return out, result


@pytest.fixture(scope="module")
def fsdp(tiny_llama, instruction_file, cache_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = _ok(torchrun(tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FSDP), cache_dir))
    return out, result


def test_ranks_form_one_ddp_job_with_the_global_batch_on_the_start_screen(ddp):
    _, result = ddp
    assert result.stdout.count("finetune: start") == 1  # one run, not two single-process runs
    assert "processes    2 (DDP over gloo)" in result.stdout
    assert "global batch: 4 per rank x accum 2 x 2 rank(s)" in result.stdout


def test_ddp_losses_equal_one_process_of_the_same_global_batch(ddp, one_process):
    ddp_run, _ = ddp
    many, one = _summary(ddp_run), _summary(one_process)
    assert len(_losses(ddp_run)) == STEPS
    assert _losses(ddp_run) == pytest.approx(_losses(one_process), rel=1e-6)
    assert [e for _, e in many["eval_loss"]] == pytest.approx([e for _, e in one["eval_loss"]], rel=1e-6)
    # Every row of every step seen once across the ranks: the same tokens as one process.
    assert many["tokens"] == one["tokens"]


def test_ddp_adapter_matches_one_process(ddp, one_process):
    ddp_run, _ = ddp
    many, one = _adapter(ddp_run / "adapter"), _adapter(one_process / "adapter")
    assert many.keys() == one.keys()
    for key in many:
        torch.testing.assert_close(many[key], one[key], rtol=1e-4, atol=1e-5)


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


# What a finished 2-rank DDP run of COMMON leaves: no staging leftovers, no second copy of anything.
_CHECKPOINT = ["adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
               "adapter/finetune_manifest.json", "finetune_manifest.json", "optimizer.pt",
               "rng-rank000.pt", "rng-rank001.pt", "scheduler.pt", "trainer_state.json"]
DDP_RUN_FILES = sorted(
    ["config.json", "summary.json", "curves.png", "adapter/README.md", "adapter/adapter_config.json",
     "adapter/adapter_model.safetensors", "adapter/finetune_manifest.json"]
    + [f"checkpoints/step-{s:06d}/{f}" for s in (2, 4) for f in _CHECKPOINT]
)


def test_only_rank_0_writes_and_every_rank_saves_its_rng(ddp):
    run_dir, result = ddp
    assert _files(run_dir) == DDP_RUN_FILES
    assert result.stdout.count("finetune: done") == 1


def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_as_the_one_node_run(
        ddp, tiny_llama, instruction_file, cache_dir, tmp_path):
    # Two torchrun launchers of one rank each, as two nodes would start them (scripts/slurm_finetune.sbatch
    # uses the same flags): the rendezvous, not the command line, gives each its node rank. One of them
    # hosts the rendezvous store on the endpoint, the other connects to it.
    out = tmp_path / "run"  # on a cluster, a folder every node sees
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"two-nodes-{port}",
               "-m", "finetune", *tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FLOAT32)]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-3000:] + stderr[-5000:]
    stdout = "".join(stdout for stdout, _ in results)
    assert stdout.count("finetune: start") == stdout.count("finetune: done") == 1  # from rank 0's node only
    assert "processes    2 (DDP over gloo)" in stdout
    assert "global batch: 4 per rank x accum 2 x 2 rank(s)" in stdout
    assert _files(out) == DDP_RUN_FILES
    assert _losses(out) == pytest.approx(_losses(ddp[0]), rel=1e-6)


def test_every_example_once_per_epoch_across_ranks():
    rows = list(range(37))
    for world_size in (1, 2, 3):
        for epoch in range(3):
            seen = []
            for rank in range(world_size):
                sampler = EpochBatches(rows, 4, lambda b: b, seed=7, rank=rank, world_size=world_size)
                sampler.load_state_dict({"epoch": epoch, "batch_in_epoch": 0})
                seen += [i for batch in sampler._epoch_indices(epoch) for i in batch]
            # Full global batches only (37 rows: 9 batches of 4, dropped to a multiple of the ranks).
            global_batches = (37 // 4) - (37 // 4) % world_size
            assert len(seen) == len(set(seen)) == global_batches * 4


def test_ddp_resume_equals_the_uninterrupted_run(ddp, tiny_llama, instruction_file, cache_dir, tmp_path):
    ddp_run, _ = ddp
    out = tmp_path / "resumed"
    args = tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FLOAT32,
                         f"train.resume={ddp_run / 'checkpoints' / 'step-000002'}")
    result = _ok(torchrun(args, cache_dir))
    assert "resuming     from" in result.stdout
    assert _losses(out) == pytest.approx(_losses(ddp_run), rel=1e-6)
    for key, value in _adapter(out / "adapter").items():
        torch.testing.assert_close(value, _adapter(ddp_run / "adapter")[key], rtol=1e-5, atol=1e-6)


def test_resume_on_another_world_size_is_refused(ddp, tiny_llama, instruction_file, cache_dir, tmp_path):
    ddp_run, _ = ddp
    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "one", *COMMON, *FLOAT32,
                         f"train.resume={ddp_run / 'checkpoints' / 'step-000002'}")
    result = run_cli(args, cache_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "processes 2 -> 1" in result.stderr


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_one_checkpoint(
        tiny_llama, instruction_file, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_llama, instruction_file, out, "train.max_steps=200", "data.eval_fraction=0")
    env = {**cli_env(cache_dir), "MASTER_PORT": str(_free_port())}
    launcher = subprocess.Popen(torchrun_command(args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    chunks: list[bytes] = []

    def pump() -> None:  # read1: tqdm redraws its bar with \r, never a newline
        while chunk := launcher.stdout.read1(4096):
            chunks.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not re.search(r"training: +\d+%\|[^|]*\| *[1-9]\d*/200", b"".join(chunks).decode(errors="replace")):
        assert launcher.poll() is None and time.monotonic() < deadline, b"".join(chunks).decode()[-3000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(300)
    reader.join(10)
    output = b"".join(chunks).decode(errors="replace")
    # torchrun answers its own SIGTERM with exit 1 (its SignalException), whatever the ranks returned;
    # scripts/slurm_finetune.sbatch reads the run folder, not this code, to decide on a requeue.
    assert code != 0, output[-3000:]
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 1, output[-3000:]  # rank 0 says it once, for both ranks
    step = int(stopped[0].split("at step ")[1].split()[0])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step-{step:06d}"]
    state = json.loads((out / "checkpoints" / checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2
    assert not (out / "adapter").exists()


def test_fsdp2_runs_on_cpu_ranks(fsdp):
    _, result = fsdp
    # accelerate takes its FSDP branch only for GPU process groups; finetune.distributed promotes CPU
    # ranks. An accelerate that changes this must fail here, not silently fall back to DDP.
    assert "processes    2 (FSDP2 over gloo)" in result.stdout


def test_fsdp_loss_curve_matches_ddp(fsdp, ddp):
    fsdp_losses, ddp_losses = _losses(fsdp[0]), _losses(ddp[0])
    # FSDP runs bf16 mixed precision (its shards are bf16), DDP float32: equal to bf16 rounding.
    assert fsdp_losses == pytest.approx(ddp_losses, rel=5e-3)
    assert fsdp_losses[-1] < fsdp_losses[0]


def test_fsdp_checkpoint_holds_every_ranks_shard(fsdp):
    folder = fsdp[0] / "checkpoints" / "step-000002"
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "rng-rank000.pt",
            "rng-rank001.pt"} <= names
    assert "optimizer.pt" not in names
    manifest = json.loads((folder / "finetune_manifest.json").read_text())
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest["files"])


def test_fsdp_adapter_loads_with_plain_peft(fsdp, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = fsdp[0] / "adapter"
    saved = _adapter(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        # PEFT stores keys without the adapter name; the model has it (".default").
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        torch.testing.assert_close(loaded[name], value)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, gathered whole


def test_fsdp_resume_equals_the_uninterrupted_run(fsdp, tiny_llama, instruction_file, cache_dir, tmp_path):
    fsdp_run, _ = fsdp
    out = tmp_path / "resumed"
    args = tiny_run_args(tiny_llama, instruction_file, out, *COMMON, *FSDP,
                         f"train.resume={fsdp_run / 'checkpoints' / 'step-000002'}")
    _ok(torchrun(args, cache_dir))
    assert _summary(out)["losses"] == _summary(fsdp_run)["losses"]  # bitwise: same shards, same order
    for key, value in _adapter(out / "adapter").items():
        torch.testing.assert_close(value, _adapter(fsdp_run / "adapter")[key], rtol=0, atol=0)


@pytest.mark.parametrize(("overrides", "fix"), [
    (["quant=int8"], "use quant.mode=nf4 quant.quant_storage=bfloat16, or dist=ddp"),
    ([], "set quant.quant_storage=bfloat16"),
    (["quant.quant_storage=bfloat16", "+quant.device_map={lm_head:0}"], "remove quant.device_map"),
    (["quant.quant_storage=bfloat16", "speed.compile=true", "speed.fp32_frozen=false"], "set speed.compile=false"),
])
def test_fsdp_refuses_what_it_cannot_shard_before_loading(overrides, fix):
    from finetune.preflight import config_problems
    from finetune.run import compose

    cfg = compose(["output_dir=/tmp/unused", "dist=fsdp", *overrides])
    problems = config_problems(cfg, cuda_available=True, bf16_supported=True)
    assert len(problems) == 1 and fix in problems[0], problems


def test_dist_fsdp_selects_fsdp():
    from finetune.preflight import config_problems
    from finetune.run import compose

    cfg = compose(["output_dir=/tmp/unused", "dist=fsdp", "quant.quant_storage=bfloat16"])
    assert cfg.dist.strategy == "fsdp" and cfg.speed.loss_chunk_size > 0  # the chunked loss runs under FSDP
    assert config_problems(cfg, cuda_available=False, bf16_supported=False) == []
    assert compose(["output_dir=/tmp/unused"]).dist.strategy == "auto"
    offload = compose(["output_dir=/tmp/unused", "dist=fsdp", "quant.quant_storage=bfloat16", "dist.cpu_offload=true"])
    assert config_problems(offload, cuda_available=True, bf16_supported=True) == []
    assert "remove dist.cpu_offload" in config_problems(offload, cuda_available=False, bf16_supported=False)[0]
    assert "use dist=fsdp" in compose(["output_dir=/tmp/unused", "dist.cpu_offload=true"]).problems()[0]


LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192)


def _llama_70b_cfg(*overrides: str):
    from finetune.run import compose

    cfg = compose(["output_dir=/tmp/unused", "model.random_init=true", "model.name_or_path=llama-70b-shapes",
                   "quant.quant_storage=bfloat16", "train.batch_size=1", "data.max_length=2048", *overrides])
    cfg.model.architecture, cfg.model.architecture_of = dict(LLAMA_70B), None  # shapes only: no weights are built
    return cfg


def test_footprint_per_rank_on_llama_70b_shapes():
    from finetune.footprint import estimate_footprint, estimate_training_peak

    fsdp_cfg, ddp_cfg = _llama_70b_cfg("dist=fsdp"), _llama_70b_cfg()
    fp = estimate_footprint(fsdp_cfg, "", "nf4")
    one = {name: size for name, size in estimate_training_peak(ddp_cfg, "", fp).parts}
    base_one = next(size for name, size in one.items() if name.startswith("base weights"))
    lora_one = next(size for name, size in one.items() if name.startswith("LoRA parameters"))
    block = (fp.quantized_bytes - fp.quant_state) // 80
    totals = []
    for n in (2, 4, 8):
        # DDP: every rank holds everything one process does.
        assert estimate_training_peak(ddp_cfg, "", fp, n).total == sum(one.values())
        peak = estimate_training_peak(fsdp_cfg, "", fp, n)
        parts = dict(peak.parts)

        def part(prefix: str, parts=parts) -> int:
            return next(size for name, size in parts.items() if name.startswith(prefix))
        assert part(f"base weights, 1/{n}") == (base_one - fp.quant_state) // n
        assert part("4-bit constants, whole") == fp.quant_state  # outside the parameters: not sharded
        assert part("two decoder blocks gathered") == 2 * block
        assert part("output head gathered in bf16") == 128256 * 8192 * 2
        assert part("LoRA parameters") == lora_one // n
        assert part("layer checkpoints") == one[next(k for k in one if k.startswith("layer checkpoints"))]
        totals.append(peak.total)
    assert totals[0] > totals[1] > totals[2]
    # llama-70B in NF4 (about 36 GiB of packed weights) does not fit one 24 GiB card, and does on 8.
    assert sum(one.values()) > 40 * 2**30 and totals[2] < 24 * 2**30


def test_footprint_cli_takes_the_world_size(tiny_llama, cache_dir):
    result = run_cli([f"model.name_or_path={tiny_llama}", "dist=fsdp", "quant.quant_storage=bfloat16", "world_size=4"],
                     cache_dir, module="finetune.footprint")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training peak estimate for this recipe, per rank of 4 (FSDP)" in result.stdout
    assert "base weights, 1/4 of the parameters" in result.stdout
    bad = run_cli([f"model.name_or_path={tiny_llama}", "world_size=0"], cache_dir, module="finetune.footprint")
    assert bad.returncode != 0 and "world_size='0'" in bad.stderr


NONFINITE_ON_RANK_1 = '''
import json, sys, torch
from pathlib import Path
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM
from finetune.config import SpeedConfig, TrainConfig
from finetune.loop import build_optimizer, build_scheduler, train_step
from finetune.run import process_state

process_state()
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
with torch.no_grad():
    model.get_input_embeddings().weight[31] = float("inf")  # token 31: only rank 1's batch has it
params = list(model.parameters())
train = TrainConfig(warmup_steps=0)
optimizer = build_optimizer(params, train)
scheduler = build_scheduler(optimizer, train)
model, optimizer = accelerator.prepare(model, optimizer)
ids = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(accelerator.process_index))
if accelerator.process_index == 1:
    ids[0, 3] = 31
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
before = [p.detach().clone() for p in params]
outcome = train_step(model, optimizer, scheduler, [batch], accelerator=accelerator, params=params,
                     speed=SpeedConfig(loss_chunk_size=0), max_grad_norm=1.0)
# one file per rank: two processes printing to one pipe interleave their lines
Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps({
    "rank": accelerator.process_index, "finite": outcome.finite, "loss": str(outcome.loss),
    "unchanged": all(torch.equal(a, b) for a, b in zip(before, params))}))
'''


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(cache_dir, tmp_path):
    script = tmp_path / "nonfinite.py"
    script.write_text(NONFINITE_ON_RANK_1)
    env = {**cli_env(cache_dir), "MASTER_PORT": str(_free_port())}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    # Rank 0's own loss was finite; the step's loss is summed over the ranks first, so both skip.
    assert all(not r["finite"] and r["unchanged"] for r in ranks), ranks
    assert ranks[0]["loss"] == ranks[1]["loss"]
