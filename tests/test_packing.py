"""Packed rows give every example exactly the loss it has unpacked: no attention or loss across borders."""

from __future__ import annotations

from typing import Optional

import datasets
import torch
import torch.nn.functional as F

from finetune.data import Collator
from finetune.loss import IGNORE_INDEX, causal_lm_loss_sum, count_targets, model_inputs
from finetune.model import build_model
from finetune.packing import fill_ratio, pack
from finetune.run import compose

TEXTS = ["What is the capital of France? Paris.", "The quick brown fox jumps over the lazy dog.",
         "Answer briefly: yes", "Fine-tuning adapts a pretrained language model to new data."]


def per_example_loss_sums(model, batch: dict[str, torch.Tensor], chunk_size: int = 0,
                          example_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss sum per example (rows, or packed examples given `example_ids` per token)."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    if example_ids is None:
        return nll.sum(dim=1)
    ids = example_ids[:, 1:]
    return torch.zeros(int(ids.max()) + 1, dtype=nll.dtype).index_add_(0, ids.reshape(-1), nll.reshape(-1))



def _examples(tokenizer) -> datasets.Dataset:
    rows = []
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
        labels[: 2 + i] = [-100] * (2 + i)  # a prompt of varying length
        rows.append({"input_ids": ids, "labels": labels})
    return datasets.Dataset.from_list(rows)


def _model(tiny_llama):
    cfg = compose([f"model.name_or_path={tiny_llama}", "output_dir=/tmp/unused", "lora.dropout=0.0",
                   "quant.compute_dtype=float32"])
    model = build_model(cfg, str(tiny_llama), torch.device("cpu"))[0]
    return model.eval()


def test_pack_puts_examples_in_rows_with_restarting_positions(tokenizer):
    examples = _examples(tokenizer)
    packed = pack(examples, max_length=40)
    lengths = [len(r) for r in examples["input_ids"]]
    assert sum(len(r) for r in packed["input_ids"]) == sum(lengths)
    assert all(len(r) <= 40 for r in packed["input_ids"]) and len(packed) < len(examples)
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert starts[0] == 0 and len(starts) >= 2
    assert all(row["labels"][s] == -100 for s in starts)
    assert 0 < fill_ratio(packed, 40) <= 1


def test_packed_batch_gives_the_unpacked_per_example_losses(tiny_llama, tokenizer):
    model = _model(tiny_llama)
    examples = _examples(tokenizer)
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        unpacked = per_example_loss_sums(model, collate(list(examples)))
        packed_rows = pack(examples, max_length=64)
        assert len(packed_rows) == 1  # all four examples share one row
        batch = collate(list(packed_rows))
        example_ids = (torch.tensor(packed_rows[0]["position_ids"]) == 0).cumsum(0)[None] - 1
        packed = per_example_loss_sums(model, batch, example_ids=example_ids)
        torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
        # the training loss (sum over all targets) agrees too, and counts the same targets
        total_unpacked = causal_lm_loss_sum(model, collate(list(examples)))
        total_packed = causal_lm_loss_sum(model, batch, chunk_size=5)
        torch.testing.assert_close(total_packed, total_unpacked, rtol=1e-5, atol=1e-4)
        assert count_targets(batch) == count_targets(collate(list(examples)))


def test_an_example_cannot_see_its_neighbour(tiny_llama, tokenizer):
    model = _model(tiny_llama)
    examples = _examples(tokenizer)
    packed_rows = pack(examples, max_length=64)
    collate = Collator(tokenizer.pad_token_id)
    batch = collate(list(packed_rows))
    changed = {k: v.clone() for k, v in batch.items()}
    n_first = len(examples[0]["input_ids"])
    changed["input_ids"][0, 1:n_first] = (changed["input_ids"][0, 1:n_first] + 7) % 500 + 3
    example_ids = (batch["position_ids"][0] == 0).cumsum(0)[None] - 1
    with torch.no_grad():
        before = per_example_loss_sums(model, batch, example_ids=example_ids)
        after = per_example_loss_sums(model, changed, example_ids=example_ids)
    assert not torch.allclose(before[0], after[0])  # the edited example changed
    torch.testing.assert_close(after[1:], before[1:], rtol=1e-6, atol=1e-6)  # its neighbours did not


def test_a_packed_run_through_the_cli_trains_and_reports_packing(tiny_llama, instruction_file, cache_dir, tmp_path):
    from tests.conftest import run_cli, tiny_run_args

    result = run_cli(tiny_run_args(tiny_llama, instruction_file, tmp_path / "run", "data.packing=true"), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed: 28 examples into" in result.stdout


def test_packing_is_refused_for_a_model_without_position_ids(tiny_bloom, instruction_file, cache_dir, tmp_path):
    from tests.conftest import run_cli, tiny_run_args

    result = run_cli(tiny_run_args(tiny_bloom, instruction_file, tmp_path / "run", "data.packing=true"), cache_dir)
    assert result.returncode == 2 and "data.packing=true needs a model that takes position ids" in result.stderr
