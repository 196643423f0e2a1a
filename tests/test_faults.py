"""Faults and bad input through the real CLI: each is a clear message or a counted drop, never a traceback.

Covered here: messy rows, a dataset empty after filtering or smaller than one batch, a tokenizer
with no pad token (and one with no eos either), unknown keys, wrong types, lora.r=0, a missing
target module, an absurd learning rate, a missing resume checkpoint, a non-finite loss, an adapter
that never learned, a full disk during a save, and a missing, corrupt or wrong-base adapter.
Truncated checkpoints, SIGKILL during saves and resuming on other settings are in test_resume.py.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.adapter import check_saved_adapter, save_adapter
from finetune.atomic import CheckpointError
from finetune.checkpoint import find_latest_complete, verify_checkpoint
from finetune.model import build_model
from finetune.run import compose
from finetune.tiny import TINY_ARCHITECTURES, save_random_model
from tests.conftest import INSTRUCTION_ROWS, run_cli, tiny_run_args


def assert_clean_failure(result, *messages: str, code: int = 2) -> None:
    """The run failed with `code`, said each of `messages`, and printed no Python traceback."""
    assert result.returncode == code, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    for message in messages:
        assert message in result.stderr, f"{message!r} not in:\n{result.stderr[-3000:]}"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def no_pad_tokenizer(tiny_llama, tmp_path_factory) -> Path:
    """The tiny tokenizer with its pad token removed (as many base-model tokenizers ship)."""
    folder = tmp_path_factory.mktemp("no_pad")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def messy_run(tiny_llama, no_pad_tokenizer, cache_dir, tmp_path_factory):
    """A one-step run on a private copy of the tiny base, with messy rows and a tokenizer without pad."""
    root = tmp_path_factory.mktemp("messy")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    rows = [
        *INSTRUCTION_ROWS,
        {"instruction": "", "output": "empty prompt"},
        {"instruction": "   \n\t", "output": "whitespace prompt"},
        {"instruction": "no output field"},
        {"instruction": 7, "output": "seven"},  # a number is its text: kept
        {"instruction": "word " * 200, "output": "a prompt longer than data.max_length"},
    ]
    data = write_jsonl(root / "messy.jsonl", rows)
    out = root / "run"
    result = run_cli(tiny_run_args(base, data, out, "train.max_steps=1", f"model.tokenizer={no_pad_tokenizer}"),
                     cache_dir)
    return base, out, result


def test_messy_rows_are_dropped_and_counted_and_a_missing_pad_token_is_eos(messy_run):
    _, out, result = messy_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "data: 41 rows read, 37 kept" in result.stdout
    # empty, whitespace-only, missing field; the long prompt leaves no target token
    assert ("dropped: 2 with an empty 'instruction' (e.g. row 37), 1 with a missing 'output' (e.g. row 39), "
            "1 with no target tokens within data.max_length (e.g. row 41)") in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.fixture
def bad_rows(tmp_path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [{"instruction": " ", "output": "x"}, {"instruction": "q"},
                                                {"instruction": "q", "output": ["not", "text"]}])


def _no_special_tokens(tiny_llama: Path, folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(pad_token=None, eos_token=None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


FAST_FAILURES = {
    # name: (extra overrides, data file ("good" or "bad"), messages)
    "dataset empty after filtering": ([], "bad", ["finetune data error: all 3 rows of split 'train'",
                                                  "1 with 'output' of type list (e.g. row 3)"]),
    "smaller than one batch": (["train.batch_size=64"], "good", ["fewer than one global batch",
                                                               "lower train.batch_size or add data"]),
    "unknown config key": (["lora.alhpa=8"], "good", ["unknown config key 'lora.alhpa': did you mean 'lora.alpha'?"]),
    "lora.r=0": (["lora.r=0"], "good", ["lora.r must be a positive integer (got 0)"]),
    "missing target module": (["lora.target_modules=[q_projj]"], "good",
                              ["'q_projj', which this model does not have (did you mean 'q_proj'?)"]),
    "learning rate out of float32": (["train.lr=1e39"], "good", ["train.lr must be positive and finite in float32"]),
    "tokenizer with no pad and no eos": (["model.tokenizer={nospecial}"], "good",
                                         ["has neither a pad nor an eos token", "model.tokenizer"]),
    "missing data file": (["data.path={tmp}/nowhere.jsonl"], "good", ["nowhere.jsonl' does not exist"]),
    "missing resume checkpoint": (["train.resume={tmp}/nowhere"], "good",
                                  ["train.resume={tmp}/nowhere: cannot resume from it", "does not exist"]),
    "resume a run with no checkpoint": (["train.resume=auto"], "good", ["holds no complete checkpoint"]),
}


@pytest.mark.parametrize("case", list(FAST_FAILURES))
def test_bad_input_fails_fast_with_a_message_and_no_traceback(case, tiny_llama, instruction_file, bad_rows,
                                                              cache_dir, tmp_path):
    extra, data, messages = FAST_FAILURES[case]
    (tmp_path / "nospecial").mkdir()
    fill = {"tmp": tmp_path, "nospecial": _no_special_tokens(tiny_llama, tmp_path / "nospecial")}
    extra = [e.format(**fill) for e in extra]
    out = tmp_path / "run"
    result = run_cli(tiny_run_args(tiny_llama, bad_rows if data == "bad" else instruction_file, out, *extra), cache_dir)
    assert_clean_failure(result, *[m.format(**fill) for m in messages])
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_a_wrong_type_is_named_without_a_traceback(cache_dir, tmp_path):
    result = run_cli(["train.max_steps=ten", f"output_dir={tmp_path}/run"], cache_dir)
    # Checked while composing, before Hydra runs: one clean config error, exit 2.
    assert_clean_failure(result, "could not be converted to Integer", "train.max_steps")


def test_non_finite_loss_stops_the_run_and_no_adapter_is_saved(tiny_llama, instruction_file, cache_dir, tmp_path):
    # A learning rate so large that the first update blows the activations up: from step 2 on the
    # loss is NaN (checked: the bf16 tiny model really gets there), every step is skipped.
    out = tmp_path / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "train.lr=1e20", "train.max_steps=10",
                                   "train.max_nonfinite_steps=3", "train.save_every=1"), cache_dir)
    assert_clean_failure(result, "finetune training error: 3 steps in a row had a non-finite loss or gradient "
                                 "(last at step 4)", "lower train.lr", "No adapter was saved from these steps")
    assert "step 2: non-finite loss nan" in result.stdout  # tqdm.write prints to stdout
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    # The checkpoints written before the stop hold finite adapters (skipped steps change nothing).
    for checkpoint in (out / "checkpoints").glob("step-*"):
        assert verify_checkpoint(checkpoint) == []
        weights = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_step_leaves_adapter_optimizer_and_schedule_as_they_were():
    # Fused AdamW's update is queued before the host reads the loss (finetune.loop.train_step) and
    # skipped on the device: the parameters, both moments, the step count and the LR must all stay.
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.config import SpeedConfig, TrainConfig
    from finetune.loop import _skips_non_finite_on_device, build_optimizer, build_scheduler, train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    params = list(model.parameters())
    train = TrainConfig(warmup_steps=0, lr_scheduler="linear", max_steps=10)
    optimizer = build_optimizer(params, train)
    scheduler = build_scheduler(optimizer, train)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert _skips_non_finite_on_device(optimizer, accelerator.device)
    ids = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():
        return train_step(model, optimizer, scheduler, [batch], accelerator=accelerator, params=params,
                          speed=SpeedConfig(loss_chunk_size=0), max_grad_norm=1.0)

    assert step().finite  # the moments exist and are not zero
    state = lambda: [p.detach().clone() for p in params] + [  # noqa: E731
        t.clone() for p in params for t in optimizer.state[p].values()]
    before, lr = state(), scheduler.get_last_lr()
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[0, 0]] = float("nan")
    outcome = step()
    assert not outcome.finite
    after = state()
    with torch.no_grad():  # the poisoned row is the only change: the update was skipped
        model.get_input_embeddings().weight[ids[0, 0]] = before[0][ids[0, 0]]
    after[0] = params[0].detach()
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and scheduler.get_last_lr() == lr
    assert step().finite and not torch.equal(params[1], before[1])  # and the next finite step updates


def test_an_adapter_that_never_learned_is_not_saved(tiny_llama, instruction_file, cache_dir, tmp_path):
    # lr=1e-50 underflows to a zero update in float32: LoRA B never leaves its zero initialization.
    out = tmp_path / "run"
    result = run_cli(tiny_run_args(tiny_llama, instruction_file, out, "train.lr=1e-50"), cache_dir)
    assert_clean_failure(result, "finetune checkpoint error: refusing to save a broken adapter",
                         "14 of 14 LoRA B matrices are still all zero after training", "train.lr too small")
    assert not (out / "adapter").exists()


@pytest.fixture(scope="module")
def peft_model(tiny_llama):
    cfg = compose(tiny_run_args(tiny_llama, Path("unused.jsonl"), Path("unused")))
    return build_model(cfg, str(tiny_llama), torch.device("cpu"))[0]


def test_a_non_finite_adapter_is_never_written(peft_model, tmp_path):
    lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    try:
        with pytest.raises(CheckpointError, match="1 tensor\\(s\\) hold NaN or inf"):
            save_adapter(peft_model, tmp_path / "adapter", {"kind": "test"}, trained=False)
    finally:
        with torch.no_grad():
            lora_b.zero_()
    # Nothing was left behind: not the folder, not its staging copy.
    assert list(tmp_path.iterdir()) == []


def test_a_saved_adapter_missing_a_lora_tensor_is_refused(peft_model, tmp_path):
    save_adapter(peft_model, tmp_path / "adapter", {"kind": "test"}, trained=False)
    weights_file = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, weights_file)
    with pytest.raises(CheckpointError, match="missing \\['" + dropped.replace(".", "\\.")):
        check_saved_adapter(peft_model, tmp_path / "adapter", trained=False)


def _limit_file_size(max_bytes: int):
    def limit() -> None:
        # Writes past the limit then fail with EFBIG ("File too large"), as a full disk fails with
        # ENOSPC; without ignoring SIGXFSZ the kernel would kill the process instead.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_llama, instruction_file, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_llama, instruction_file, out, "train.max_steps=6", "train.save_every=1")
    first = run_cli([*args, "train.stop_after_steps=2"], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = out / "checkpoints" / "step-000002"
    files_before = {p: p.read_bytes() for p in before.rglob("*") if p.is_file()}

    # The adapter file of the next checkpoint (about 130 kB) no longer fits.
    full = run_cli([*args, "train.resume=auto"], cache_dir, preexec_fn=_limit_file_size(100_000))
    assert_clean_failure(full, "finetune checkpoint error: could not write the checkpoint of step 3",
                         "File too large", "Nothing that was already saved was touched", "train.resume=auto")
    assert find_latest_complete(out)[0] == before
    assert {p: p.read_bytes() for p in before.rglob("*") if p.is_file()} == files_before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written staging

    # With room again, the run goes on from the checkpoint that survived.
    resumed = run_cli([*args, "train.resume=auto"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == str(before)


def test_a_missing_or_corrupt_adapter_is_refused(messy_run, cache_dir, tmp_path):
    _, out, _ = messy_run
    missing = run_cli([f"adapter={tmp_path}/nowhere", "prompt=hi"], cache_dir, module="finetune.generate")
    assert_clean_failure(missing, "nowhere does not exist: pass a run folder or an adapter folder")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(out / "adapter", corrupt)
    weights = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # same size, one flipped byte
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(weights))
    result = run_cli([f"adapter={corrupt}", "prompt=hi"], cache_dir, module="finetune.generate")
    assert_clean_failure(result, "cannot be trusted", "does not match its checksum in the manifest (corrupt)")


def test_an_adapter_is_refused_on_a_base_that_is_now_another_model(messy_run, cache_dir):
    base, out, _ = messy_run
    manifest = json.loads((out / "adapter" / "finetune_manifest.json").read_text())
    # The manifest records the base, its quantization and the tokenizer, and their fingerprints.
    assert manifest["base_model"] == str(base) and manifest["quant"]["mode"] == "nf4"
    assert manifest["tokenizer"].endswith("no_pad0")
    assert set(manifest["fingerprint"]) == {"base", "quant", "lora", "tokenizer", "data", "objective"}

    # The base folder now holds another model of the same architecture (other weights).
    save_random_model(base, TINY_ARCHITECTURES["llama"], seed=1)
    result = run_cli([f"adapter={out}", "prompt=hi"], cache_dir, module="finetune.generate")
    assert_clean_failure(result, f"the adapter at {out / 'adapter'} was trained on the base model at {base}",
                         "now holds a different model")
