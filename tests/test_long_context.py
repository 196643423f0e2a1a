"""The long-context options compute what the plain checkpointed path computes: loss and gradients.

speed.mlp_chunk_size runs each MLP on slices of the sequence; speed.offload_checkpoints keeps each
checkpointed block's input in CPU memory and reruns the block in backward, which must draw the
forward's dropout masks again.
"""

from __future__ import annotations

import pytest
import torch

from finetune.speed.compile import decoder_blocks
from tests.conftest import lora_model, loss_and_grads


def _batch() -> dict:
    ids = torch.randint(3, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _assert_same(model_a, model_b, batch: dict, autocast: bool = True, max_relative: float = 0.0) -> None:
    """Equal losses and gradients: bit for bit, or each gradient within `max_relative` of the first's norm."""
    for model in (model_a, model_b):
        model.train()
    torch.manual_seed(1)
    loss_a, grads_a = loss_and_grads(model_a, batch, 0, autocast)
    torch.manual_seed(1)
    loss_b, grads_b = loss_and_grads(model_b, batch, 0, autocast)
    assert abs(float(loss_b) - float(loss_a)) <= max_relative * abs(float(loss_a))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    # every block's adapters learn, the first block's too (its input needs no gradient)
    first = [n for n in grads_b if ".layers.0." in n]
    assert first and all(grads_b[n].abs().sum() > 0 for n in first)
    for name in grads_a:
        assert (grads_b[name] - grads_a[name]).norm() <= max_relative * grads_a[name].norm(), name


def test_offloaded_checkpoints_give_the_plain_loss_and_gradients_with_dropout(tiny_llama):
    # lora_model seeds the adapters: both models start equal
    plain = lora_model(tiny_llama, "lora.dropout=0.1")
    offloaded = lora_model(tiny_llama, "lora.dropout=0.1", "speed.offload_checkpoints=true")
    _assert_same(plain, offloaded, _batch())


def test_mlp_slices_give_the_plain_loss_and_gradients(tiny_llama):
    # fp32 arithmetic: only the order of the weight gradients' sums over tokens changes (about 5e-7)
    fp32 = ("quant.compute_dtype=float32", "train.mixed_precision=no")
    plain, sliced = lora_model(tiny_llama, *fp32), lora_model(tiny_llama, *fp32, "speed.mlp_chunk_size=5")
    _assert_same(plain, sliced, _batch(), autocast=False, max_relative=1e-5)


def test_offloaded_blocks_with_mlp_slices_replay_the_slices_dropout(tiny_llama):
    sliced = lora_model(tiny_llama, "lora.dropout=0.1", "speed.mlp_chunk_size=5")
    both = lora_model(tiny_llama, "lora.dropout=0.1", "speed.mlp_chunk_size=5", "speed.offload_checkpoints=true")
    _assert_same(sliced, both, _batch())
    blocks = decoder_blocks(both)
    assert all(getattr(b.mlp, "finetune_chunk", None) == 5 for b in blocks)
    assert all(b._gradient_checkpointing_func.__name__ == "offloaded_checkpoint" for b in blocks)


@pytest.mark.usefixtures("fresh_compile_cache")
def test_compiled_blocks_offload_their_saved_inputs_and_give_the_same_loss_and_gradients(tiny_llama):
    # Compiled blocks checkpoint inside the compiled region; offloading moves what they save for
    # backward (the block input) through host copies. Same compiled graphs: bit for bit, with dropout.
    fast = ("lora.dropout=0.1", "speed=fast")
    compiled = lora_model(tiny_llama, *fast)
    offloaded = lora_model(tiny_llama, *fast, "speed.offload_checkpoints=true")
    blocks = decoder_blocks(offloaded)
    # A padded batch longer than the hidden size: the 4-D attention mask every block saves is larger
    # than a block's input, and stays on the device (one shared tensor; moving it would free nothing).
    ids = torch.randint(3, 100, (2, 80), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    _assert_same(compiled, offloaded, batch)
    hidden = offloaded.config.hidden_size
    block_input = batch["input_ids"].numel() * hidden * 2  # bf16 under autocast
    moved = blocks[0].finetune_offload.bytes_moved
    assert moved == len(blocks) * block_input, (moved, len(blocks), block_input)
    # the hooks run outside the compiled region without breaking its graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_input_embeddings_in_host_memory_give_the_same_loss_and_gradients(tiny_llama):
    from finetune.model import count_parameters

    plain = lora_model(tiny_llama, "lora.dropout=0.1")
    hosted = lora_model(tiny_llama, "lora.dropout=0.1", "speed.offload_embeddings=true")
    _assert_same(plain, hosted, _batch())
    embeddings = hosted.get_input_embeddings()
    # no longer a parameter (what asks the model for its device sees the compute device), still counted
    assert "weight" not in dict(embeddings.named_parameters())
    assert embeddings.finetune_table.shape == (hosted.config.vocab_size, hosted.config.hidden_size)
    assert count_parameters(hosted) == count_parameters(plain)


def test_offloaded_embeddings_are_refused_before_loading_for_a_tied_head(tiny_bloom):
    from finetune.preflight import model_problems
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={tiny_bloom}", "output_dir=/tmp/unused", "speed.offload_embeddings=true"])
    problems = model_problems(cfg, str(tiny_bloom), cuda_available=False)
    assert any("shares the input embedding matrix" in p and "speed.offload_embeddings=false" in p for p in problems)


def test_offloaded_embeddings_are_refused_before_loading_when_lora_trains_them(tiny_llama):
    from finetune.preflight import model_problems
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={tiny_llama}", "output_dir=/tmp/unused", "speed.offload_embeddings=true",
                   "lora.modules_to_save=[embed_tokens]"])
    problems = model_problems(cfg, str(tiny_llama), cuda_available=False)
    assert any("(model.embed_tokens) frozen in host memory" in p and "lora.modules_to_save" in p for p in problems)


def test_cli_trains_and_generates_with_embeddings_in_host_memory(tiny_llama, instruction_file, tmp_path):
    from tests.conftest import run_cli, tiny_run_args

    args = tiny_run_args(tiny_llama, instruction_file, tmp_path / "out", "speed.offload_embeddings=true",
                         "sample.prompts=[What is 2+3?]", "sample.max_new_tokens=4")
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept in CPU memory: input embeddings" in result.stdout, result.stdout[:3000]
    # samples generated before and after training: generation runs through the host-memory lookup
    assert "finetune: done" in result.stdout and "  before " in result.stdout and "  after " in result.stdout, \
        result.stdout[-3000:]


def test_offloaded_embeddings_are_refused_with_an_accelerate_placement():
    from finetune.preflight import config_problems
    from finetune.run import compose

    cfg = compose(["output_dir=/tmp/unused", "speed.offload_embeddings=true", "+quant.max_memory={0:10GiB,cpu:30GiB}"])
    problems = config_problems(cfg, cuda_available=True, bf16_supported=True)
    assert any("speed.offload_embeddings=true moves the input embeddings" in p for p in problems), problems
