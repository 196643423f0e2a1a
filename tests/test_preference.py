"""finetune/preference.py (pairs, masking, drops) and finetune/objectives.py (DPO, ORPO), checked against TRL."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from finetune.config import Config, DataConfig, TrainConfig
from finetune.data import IGNORE_INDEX, DataError
from finetune.loss import supports_chunked_loss
from finetune.objectives import (
    REFERENCE_ADAPTER,
    StepTotals,
    add_reference_copy,
    count_units,
    dpo_losses,
    preference_loss,
    sequence_logps,
)
from finetune.preference import PairCollator, build_preference_datasets
from finetune.preflight import config_problems
from finetune.tiny import build_tiny_tokenizer

EOS = "<|im_end|>"
datasets.disable_progress_bars()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def targets(tok, labels) -> str:
    return tok.decode([x for x in labels if x != IGNORE_INDEX])


def pref_cfg(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, format="preference", prompt_field="prompt", max_length=kw.pop("max_length", 128), **kw)


# ------------------------------------------------------------------------------------------------- data


def test_plain_pairs_render_through_the_chat_template_and_train_only_the_replies(tmp_path, tokenizer):
    rows = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, maybe."}]
    data = build_preference_datasets(pref_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, seed=0)
    row = data.train[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for side, reply in (("chosen", "Paris."), ("rejected", "Lyon, maybe.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert tokenizer.decode(ids).startswith(prompt)
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)  # no prompt token is a target
        assert targets(tokenizer, labels) == reply + EOS
    assert data.format == "preference" and data.report.train_rows == 1


def test_plain_pairs_with_a_prompt_template_are_prefix_plus_reply_plus_eos(tmp_path, tokenizer):
    rows = [{"prompt": "Q: 2 plus 2?", "chosen": "4", "rejected": "5" + EOS}]
    cfg = pref_cfg(write_jsonl(tmp_path / "p.jsonl", rows), prompt_template="### Q\n{prompt}\n### A\n")
    row = build_preference_datasets(cfg, tokenizer, seed=0).train[0]
    assert tokenizer.decode(row["chosen_input_ids"]) == "### Q\nQ: 2 plus 2?\n### A\n4" + EOS
    assert tokenizer.decode(row["rejected_input_ids"]) == "### Q\nQ: 2 plus 2?\n### A\n5" + EOS  # EOS not doubled
    assert targets(tokenizer, row["chosen_labels"]) == "4" + EOS
    assert targets(tokenizer, row["rejected_labels"]) == "5" + EOS


def test_chat_pairs_train_only_the_final_reply_not_earlier_assistant_turns(tmp_path, tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Capital of France?"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris"}],
             "rejected": [{"role": "assistant", "content": "I do not know"}]}]
    row = build_preference_datasets(pref_cfg(write_jsonl(tmp_path / "c.jsonl", rows)), tokenizer, seed=0).train[0]
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "Paris"}], tokenize=False)
    assert tokenizer.decode(row["chosen_input_ids"]) == full
    assert targets(tokenizer, row["chosen_labels"]) == "Paris" + EOS
    assert targets(tokenizer, row["rejected_labels"]) == "I do not know" + EOS


def test_bad_pairs_are_dropped_and_counted_by_reason(tmp_path, tokenizer):
    good = {"prompt": "Say yes", "chosen": "yes", "rejected": "no"}
    rows = [
        good,
        {"prompt": "Say yes", "chosen": "", "rejected": "no"},  # empty reply
        {"prompt": "Say yes", "chosen": "yes", "rejected": None},  # missing reply
        {"prompt": "   ", "chosen": "yes", "rejected": "no"},  # empty prompt
        {"prompt": "Say yes", "chosen": "yes " * 80, "rejected": "no"},  # too long for max_length=64
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dropped = build_preference_datasets(pref_cfg(path, max_length=64, length_policy="drop"), tokenizer, seed=0)
    r = dropped.report
    assert (r.rows, r.kept, r.dropped_empty, r.dropped_too_long, r.truncated) == (5, 1, 3, 1, 0)
    shown = "\n".join(r.lines())  # each reason with the first row it hit, as data.py reports them
    assert "1 with an empty 'chosen' (e.g. row 2)" in shown and "1 longer than data.max_length (e.g. row 5" in shown
    truncated = build_preference_datasets(pref_cfg(path, max_length=64), tokenizer, seed=0)
    assert (truncated.report.kept, truncated.report.truncated) == (2, 1)
    assert all(len(truncated.train[i]["chosen_input_ids"]) <= 64 for i in range(2))
    # A prompt that fills max_length leaves a reply with no target tokens: dropped, not trained on nothing.
    long_prompt = [good, {"prompt": "What is the capital? " * 30, "chosen": "yes", "rejected": "no"}]
    cut = build_preference_datasets(pref_cfg(write_jsonl(tmp_path / "l.jsonl", long_prompt), max_length=32),
                                    tokenizer, seed=0)
    assert (cut.report.kept, cut.report.dropped_no_target) == (1, 1)


def test_clean_errors_for_missing_columns_no_rows_left_and_chat_without_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "better": "b", "rejected": "c"}])
    with pytest.raises(DataError, match=r"needs the column\(s\) \['chosen'\].*data.chosen_field"):
        build_preference_datasets(pref_cfg(path), tokenizer, seed=0)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "chosen": "", "rejected": "c"}])
    with pytest.raises(DataError, match=r"all 1 rows .* were dropped:\n  - 1 with an empty 'chosen' \(e.g. row 1\)"):
        build_preference_datasets(pref_cfg(empty), tokenizer, seed=0)
    no_template = build_tiny_tokenizer()
    no_template.chat_template = None
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "a"}],
                                               "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="chat messages need a tokenizer with a chat template"):
        build_preference_datasets(pref_cfg(chat), no_template, seed=0)
    with pytest.raises(DataError, match="data.format=preference, not data.format=instruction"):
        build_preference_datasets(DataConfig(path=path, format="instruction"), tokenizer, seed=0)


def test_shipped_pairs_load_whole_and_are_fresh(tokenizer):
    import importlib.util

    script_path = Path(__file__).resolve().parent.parent / "scripts" / "make_preference_data.py"
    spec = importlib.util.spec_from_file_location("make_preference_data", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "run python scripts/make_preference_data.py and commit the result"
    data = build_preference_datasets(pref_cfg("embedded:terse_preferences", max_length=128), tokenizer, seed=0)
    assert data.report.rows == data.report.kept == 305
    row = data.train[0]
    assert targets(tokenizer, row["chosen_labels"]).startswith("Answer: ")
    assert len(row["rejected_input_ids"]) > len(row["chosen_input_ids"])


def test_config_checks_tie_the_objective_to_preference_data():
    def problems(**train) -> list[str]:
        cfg = Config()
        cfg.data.format = train.pop("format", "auto")
        for k, v in train.items():
            setattr(cfg.train, k, v)
        return config_problems(cfg, cuda_available=False, bf16_supported=False)

    assert not [p for p in problems(objective="dpo", format="preference") if "objective" in p or "dpo" in p]
    assert any("set data.format=preference" in p for p in problems(objective="dpo", format="instruction"))
    assert any("set train.objective=dpo or train.objective=orpo" in p for p in problems(format="preference"))
    assert any("train.objective='ppo' is not one of sft, dpo, orpo" in p for p in problems(objective="ppo"))
    assert any("train.dpo_label_smoothing must be in [0, 0.5)" in p
               for p in problems(objective="dpo", dpo_label_smoothing=0.5))


def test_pair_collator_puts_every_chosen_row_before_every_rejected_row(tokenizer):
    pairs = [
        {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_input_ids": [5, 8],
         "rejected_labels": [-100, 8]},
        {"chosen_input_ids": [9, 10], "chosen_labels": [-100, 10], "rejected_input_ids": [9, 11, 12, 13],
         "rejected_labels": [-100, -100, 12, 13]},
    ]
    batch = PairCollator(tokenizer.pad_token_id)(pairs)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [9, 10, pad, pad], [5, 8, pad, pad], [9, 11, 12, 13]]
    assert batch["labels"][:, -1].tolist() == [-100, -100, -100, 13]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert count_units(batch) == StepTotals(pairs=2, chosen_targets=3)  # 6, 7 and 10


# ------------------------------------------------------------------------------------------- objectives


def quantized_lora(model_dir: Path, nonzero_b: bool = False):
    """The real NF4 base on the CPU in fp32 compute with LoRA (no dropout), seeded."""
    from finetune.model import build_model
    from finetune.run import compose

    cfg = compose([f"model.name_or_path={model_dir}", "output_dir=/tmp/unused", "lora.dropout=0.0",
                   "quant.compute_dtype=float32", "train.mixed_precision=no", "lora.r=8"])
    torch.manual_seed(0)
    model = build_model(cfg, str(model_dir), torch.device("cpu"))[0]
    if nonzero_b:  # an adapter trained before (SFT): the reference is then this adapter, not the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".default." in n}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].data.copy_(value)


def restore_fp32_adapters(model, init: dict[str, torch.Tensor]) -> None:
    """Put every adapter (TRL's "ref" copy too) back to the initial fp32 weights.

    TRL's DPOTrainer casts the adapters of a quantized model to bf16 (its QLoRA default); finetune
    trains them in fp32. Restored before TRL builds its optimizer (in train()), so both sides run the
    same precision from the same weights.
    """
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = init[name.replace(".ref.", ".default.")].clone()


def our_steps(model, batches: list[dict], train: TrainConfig, lr: float, max_grad_norm: float):
    """Per-step losses and metrics of our objective with torch AdamW, one batch per step, as the loop runs it."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, metrics = [], []
    for batch in batches:
        loss, m = preference_loss(model, batch, train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        metrics.append({k: float(v) for k, v in m.items()})
    return losses, metrics


def recording(trainer_cls):
    """The TRL trainer class, recording each step's unrounded loss (the logged one is rounded to 4 digits)."""

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.recorded.append(loss.item())
            return loss

    Recording.recorded = []
    return Recording


def trl_args(config_cls, out: Path, steps: int, lr: float, max_grad_norm: float, **kw):
    """Settings that make TRL's run match ours: fp32 on the CPU, constant LR, batches in order, no dropout."""
    return config_cls(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=lr, max_steps=steps,
        lr_scheduler_type="constant", warmup_steps=0, train_sampling_strategy="sequential", bf16=False,
        use_cpu=True, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=max_grad_norm, seed=0, disable_dropout=True, **kw,
    )


def relative_differences(ours: list[float], theirs: list[float]) -> list[float]:
    return [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs, strict=True)]


PAIRS = [
    {"prompt": f"Question: what is {a} plus {b}?\nAnswer:", "chosen": f" {a + b}",
     "rejected": f" {a * b + 7} or so, the lazy dog"}
    for a, b in [(1, 2), (3, 4), (0, 5), (6, 1), (2, 2), (5, 3), (4, 0), (1, 1)]
]
STEPS, LR, CLIP = 4, 5e-3, 1.0


@pytest.mark.parametrize(
    "variant", ["fresh-adapter-sigmoid", "from-adapter-robust"],
)
def test_dpo_losses_match_trl_step_by_step(variant, tiny_llama, tokenizer, tmp_path):
    """Same pairs, init, order and hyperparameters: our DPO and TRL's DPOTrainer give the same per-step losses.

    fresh-adapter: B = 0, the reference is the base with the adapter switched off (TRL: a copy of the
    zero adapter, which is the base). from-adapter: an adapter already trained, frozen as our "reference"
    adapter (TRL: its "ref" copy), with rDPO's label smoothing.
    """
    from trl import DPOConfig, DPOTrainer

    from_adapter = variant.startswith("from-adapter")
    loss_type, smoothing, beta = ("robust", 0.1, 0.5) if from_adapter else ("sigmoid", 0.0, 0.5)

    # Our data pipeline on the pairs; data.prompt_template={prompt} renders them as TRL renders plain text.
    cfg = pref_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), prompt_template="{prompt}")
    data = build_preference_datasets(cfg, tokenizer, seed=0)
    collate = PairCollator(tokenizer.pad_token_id)
    batches = [collate([data.train[i] for i in range(s * 2, s * 2 + 2)]) for s in range(STEPS)]

    ours = quantized_lora(tiny_llama, nonzero_b=from_adapter)
    init = lora_state(ours)
    if from_adapter:
        add_reference_copy(ours)
    train = TrainConfig(objective="dpo", dpo_beta=beta, dpo_label_smoothing=smoothing, dpo_loss=loss_type)
    our_losses, our_metrics = our_steps(ours, batches, train, LR, CLIP)

    theirs = quantized_lora(tiny_llama)
    load_lora_state(theirs, init)
    trainer_cls = recording(DPOTrainer)
    trainer = trainer_cls(
        model=theirs, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(PAIRS),
        args=trl_args(DPOConfig, tmp_path / "trl", STEPS, LR, CLIP, beta=beta, loss_type=[loss_type],
                      label_smoothing=smoothing, max_length=None),
    )
    restore_fp32_adapters(theirs, init)
    # TRL tokenizes the text itself: it must have produced exactly our token ids and prompt masks.
    for ours_row, trl_row in zip(data.train, trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected"):
            assert ours_row[f"{side}_input_ids"] == trl_row["prompt_ids"] + trl_row[f"{side}_ids"]
            assert ours_row[f"{side}_labels"] == [IGNORE_INDEX] * len(trl_row["prompt_ids"]) + trl_row[f"{side}_ids"]
    trainer.train()

    rel = relative_differences(our_losses, trainer_cls.recorded)
    print(f"DPO {variant}: ours {our_losses}\n  trl {trainer_cls.recorded}\n  max relative difference {max(rel):.2e}")
    assert len(trainer_cls.recorded) == STEPS
    assert max(rel) < 1e-5
    assert our_losses[0] != our_losses[-1]  # the adapter moved: later steps test the updates too
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    for m, h in zip(our_metrics, logged, strict=True):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert m[key] == pytest.approx(float(h[key]), rel=1e-4, abs=1e-6), key
    if from_adapter:  # the reference adapter stayed frozen at the initial weights
        params = dict(ours.named_parameters())
        for name, value in init.items():
            reference = params[name.replace(".default.", f".{REFERENCE_ADAPTER}.")]
            assert not reference.requires_grad and torch.equal(reference, value)


def test_orpo_losses_match_trl_step_by_step(tiny_llama, tokenizer, tmp_path):
    """Our ORPO and TRL's ORPOTrainer on the same batches: the same per-step losses.

    TRL's ORPO takes its NLL over prompt and reply tokens, ours over the reply only (prompts are never
    trained), so the pairs here have empty prompts (TRL makes them its BOS alone), where the two agree.
    Both sides get TRL's own tokenized batches.
    """
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = [{"prompt": "", "chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
            for p in PAIRS]
    lam = 0.5
    ours = quantized_lora(tiny_llama)
    init = lora_state(ours)
    theirs = quantized_lora(tiny_llama)
    load_lora_state(theirs, init)
    trainer_cls = recording(ORPOTrainer)
    trainer = trainer_cls(
        model=theirs, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
        args=trl_args(ORPOConfig, tmp_path / "trl", STEPS, LR, CLIP, beta=lam, max_length=256,
                      remove_unused_columns=False),
    )
    batches = []
    for trl_batch in list(trainer.get_train_dataloader())[:STEPS]:
        cat = ORPOTrainer.concatenated_inputs(trl_batch, padding_value=tokenizer.pad_token_id)
        batches.append({"input_ids": cat["concatenated_input_ids"], "labels": cat["concatenated_labels"],
                        "attention_mask": cat["concatenated_attention_mask"]})
    assert all((b["labels"][:, 0] == IGNORE_INDEX).all() for b in batches)  # BOS: the prompt, never a target
    our_losses, our_metrics = our_steps(ours, batches, TrainConfig(objective="orpo", orpo_beta=lam), LR, CLIP)
    trainer.train()

    rel = relative_differences(our_losses, trainer_cls.recorded)
    print(f"ORPO: ours {our_losses}\n  trl {trainer_cls.recorded}\n  max relative difference {max(rel):.2e}")
    assert len(trainer_cls.recorded) == STEPS
    assert max(rel) < 1e-5
    logged = [h for h in trainer.state.log_history if "log_odds_ratio" in h]
    for m, h in zip(our_metrics, logged, strict=True):
        for key in ("rewards/chosen", "rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
            assert m[key] == pytest.approx(float(h[key]), rel=1e-4, abs=1e-6), key


def test_conservative_and_reference_free_dpo_follow_their_definitions(tiny_llama, tokenizer, tmp_path):
    """cDPO is a cross-entropy against the soft label 1 - eps; reference-free DPO uses the policy's own
    log-probabilities, here from the model's logits through cross_entropy (another code path)."""

    def per_example_loss_sums(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none").sum(1)

    z = torch.linspace(-3, 3, 7)
    cdpo = dpo_losses(z, torch.zeros(7), beta=1.0, label_smoothing=0.2)
    assert torch.allclose(cdpo, F.binary_cross_entropy_with_logits(z, torch.full((7,), 0.8), reduction="none"))

    cfg = pref_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2]), prompt_template="{prompt}")
    batch = PairCollator(tokenizer.pad_token_id)(list(build_preference_datasets(cfg, tokenizer, seed=0).train))
    model = quantized_lora(tiny_llama, nonzero_b=True)
    with torch.no_grad():
        loss, metrics = preference_loss(model, batch, TrainConfig(objective="dpo", dpo_beta=0.3, dpo_reference_free=True))
        logps = -per_example_loss_sums(model, batch)
    expected = -F.logsigmoid(0.3 * (logps[:2] - logps[2:])).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.3 * logps[:2].mean().item(), rel=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_micro_batch_shares_and_the_chunked_head_give_the_full_batch_loss_and_gradient(objective, tiny_llama,
                                                                                     tokenizer, tmp_path):
    """Gradient accumulation: each micro-batch's share, divided by the step's totals, sums to the full batch's;
    the chunked frozen-head log-probabilities (speed.loss_chunk_size) give the plain path's loss and gradient."""
    cfg = pref_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4]), prompt_template="{prompt}")
    pairs = list(build_preference_datasets(cfg, tokenizer, seed=0).train)
    collate = PairCollator(tokenizer.pad_token_id)
    model = quantized_lora(tiny_llama, nonzero_b=True)
    train = TrainConfig(objective=objective)

    def loss_and_grads(batches: list[dict], chunk_size: int = 0):
        model.zero_grad(set_to_none=True)
        totals = StepTotals(0, 0)
        for b in batches:
            totals = totals + count_units(b)
        total = sum(preference_loss(model, b, train, totals, chunk_size)[0] for b in batches)
        total.backward()
        return total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert supports_chunked_loss(model)  # chunk_size=5 below takes the chunked path, not the plain one
    full_loss, full_grads = loss_and_grads([collate(pairs)])
    for loss, grads in (loss_and_grads([collate(pairs[:1]), collate(pairs[1:])]),
                        loss_and_grads([collate(pairs)], chunk_size=5)):
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert full_grads.keys() == grads.keys() and full_grads
        for name, grad in full_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_reference_pass_leaves_the_trained_adapter_trainable_and_the_base_reference_exact(tiny_llama, tokenizer, tmp_path):
    """With no reference adapter the reference is the base: the same log-probabilities as the adapter-free model."""
    from finetune.objectives import reference_model

    cfg = pref_cfg(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2]), prompt_template="{prompt}")
    batch = PairCollator(tokenizer.pad_token_id)(list(build_preference_datasets(cfg, tokenizer, seed=0).train))
    model = quantized_lora(tiny_llama, nonzero_b=True)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        with reference_model(model) as reference:
            ref_logps, _ = sequence_logps(reference, batch)
        policy_logps, _ = sequence_logps(model, batch)
        with model.disable_adapter():
            base_logps, _ = sequence_logps(model, batch)
    assert torch.equal(ref_logps, base_logps) and not torch.allclose(ref_logps, policy_logps)
    assert model.training
    add_reference_copy(model)
    with torch.no_grad(), reference_model(model) as reference:
        copy_logps, _ = sequence_logps(reference, batch)
    torch.testing.assert_close(copy_logps, policy_logps, rtol=0, atol=1e-5)  # the copy is the adapter as it was
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapter == "default"
