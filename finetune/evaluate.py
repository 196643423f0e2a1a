"""`python -m finetune.evaluate adapter=RUN [data.*=...] [quant.mode=nf4,int8,...] [tasks=NAME,...]`.

Loss and perplexity (exp of the mean next-token NLL over target tokens, the loss training reports)
of the base alone and of base + adapter on held-out data: by default the run's eval split, rebuilt
from the recorded config exactly as training built it; with data.path=..., all of that data. With
several quant.mode values, the same base loaded in each mode side by side. Without adapter=, the
base named by model.name_or_path alone. tasks=... runs lm-evaluation-harness benchmarks instead.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

USAGE = (
    "usage: python -m finetune.evaluate adapter=RUN_OR_ADAPTER_DIR [data.path=... data.*=...] "
    "[quant.mode=nf4,int8,fp4,none] [out=FILE.json] [batch_size=N]\n"
    "       python -m finetune.evaluate model.name_or_path=MODEL data.path=DATA [quant.mode=...]\n"
    "       python -m finetune.evaluate adapter=RUN tasks=NAME[,NAME] [limit=N] [task_path=DIR]"
)
OWN_KEYS = ("adapter", "out", "tasks", "limit", "batch_size", "task_path")
DUMMY_OUTPUT_DIR = "output_dir=/tmp/finetune-evaluate-unused"  # composing needs one; nothing is written


class EvaluateError(ValueError):
    """Bad arguments to the evaluator, phrased with the fix."""


def perplexity(loss: float) -> float:
    """exp(mean token NLL); inf where that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def perplexity_line(eval_loss: float) -> str:
    """`eval loss 1.2345, perplexity 3.44`: for logging eval perplexity beside eval loss."""
    return f"eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}"


@dataclass
class Args:
    adapter: Optional[str] = None
    out: Optional[str] = None
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    batch_size: Optional[int] = None
    task_path: Optional[str] = None
    modes: Optional[list[str]] = None  # quant.mode=a,b,...; None: the run's (or the recipe's) mode
    overrides: list[str] = field(default_factory=list)  # every other key=value, as for `python -m finetune`


def _positive(key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise EvaluateError(f"{key}={value!r}: give a positive integer, e.g. {key}=8")
    return int(value)


def parse_args(argv: list[str]) -> Args:
    from finetune.config import QUANT_MODES, ConfigError, normalize_overrides

    args = Args()
    for arg in argv:
        if arg in ("-h", "--help"):
            raise EvaluateError(USAGE)
        key, eq, value = arg.partition("=")
        if not eq:
            raise EvaluateError(f"{arg!r} is not a key=value argument\n{USAGE}")
        if key in ("adapter", "out", "task_path"):
            setattr(args, key, value)
        elif key in ("limit", "batch_size"):
            setattr(args, key, _positive(key, value))
        elif key == "tasks":
            args.tasks = [t for t in value.split(",") if t]
        elif key == "quant.mode":
            args.modes = [m.strip() for m in value.split(",") if m.strip()]
            wrong = [m for m in args.modes if m not in QUANT_MODES]
            if wrong or not args.modes or len(set(args.modes)) != len(args.modes):
                raise EvaluateError(f"quant.mode={value!r}: list distinct modes out of {', '.join(QUANT_MODES)}, "
                                    "e.g. quant.mode=none,int8,nf4,fp4")
        else:
            args.overrides.append(arg)
    args.overrides, _, problems = normalize_overrides(args.overrides)
    if problems:
        raise EvaluateError(str(ConfigError(problems)))
    if args.adapter:
        model_keys = [o.split("=", 1)[0] for o in args.overrides if o.lstrip("+").startswith(("model.", "model="))]
        if model_keys:
            raise EvaluateError(f"{', '.join(model_keys)}: an adapter is evaluated on the base it was trained on; "
                                "drop the model.* overrides, or leave out adapter= to evaluate another base")
    elif not any(o.startswith("data.path=") for o in args.overrides) and not args.tasks:
        raise EvaluateError("without adapter= there is no run to take held-out data from: pass data.path=... "
                            f"(and model.name_or_path=...)\n{USAGE}")
    if args.task_path and not args.tasks:
        raise EvaluateError("task_path= names a folder of lm-eval task definitions: add tasks=NAME to run one")
    return args


def _data_overridden(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+")[len("data."):] for o in overrides if o.lstrip("+").startswith("data.")}


def build_config(args: Args):
    """The run's recorded config with the overrides applied, or the composed recipe without an adapter."""
    from omegaconf import OmegaConf

    from finetune.run import compose

    if not args.adapter:
        own_dir = [] if any(o.startswith("output_dir=") for o in args.overrides) else [DUMMY_OUTPUT_DIR]
        return compose(args.overrides + own_dir), None
    from finetune.adapter import read_adapter_manifest, resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(Path(args.adapter))
    cfg = read_adapter_manifest(adapter_dir).config
    if args.overrides:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(args.overrides))
        cfg = OmegaConf.to_object(merged)
    return cfg, adapter_dir


def held_out(cfg, tokenizer, args: Args):
    """The rows to measure: the run's eval split, or all of data.path (unless an eval split is named)."""
    from finetune.data import DataError, build_datasets

    changed = _data_overridden(args.overrides)
    whole = bool(changed & {"path", "name", "split"}) and not changed & {"eval_split", "eval_fraction"}
    if whole or not args.adapter:
        data_cfg = dataclasses.replace(cfg.data, eval_split=None, eval_fraction=0.0)
        prepared = build_datasets(data_cfg, tokenizer, cfg.train.seed)
        return prepared.train, f"{cfg.data.path} (split {cfg.data.split!r}, all rows)"
    prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    if prepared.eval is None:
        raise DataError("the run held out no eval rows (data.eval_split and data.eval_fraction were unset): pass "
                        "held-out data with data.path=...")
    what = f"split {cfg.data.eval_split!r}" if cfg.data.eval_split else f"the {cfg.data.eval_fraction:g} held out"
    return prepared.eval, f"{cfg.data.path} ({what}, as in training)"


def _autocast_dtype(cfg):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision())


def mean_nll(model, rows, tokenizer, cfg, device, batch_size: int, desc: str) -> tuple[float, int]:
    """(mean next-token NLL over the target tokens of `rows`, their count), computed as training's eval loss."""
    import torch
    from tqdm.auto import tqdm

    from finetune.data import Collator
    from finetune.loss import batch_on_device, causal_lm_loss_sum, count_targets

    collate = Collator(tokenizer.pad_token_id)
    dtype = _autocast_dtype(cfg)
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
            batch = collate(rows.select(range(start, min(start + batch_size, len(rows)))))
            batch = batch_on_device(batch, device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                total += float(causal_lm_loss_sum(model, batch, cfg.speed.loss_chunk_size))
            tokens += count_targets(batch)
    return (total / tokens if tokens else math.nan), tokens


def _load(cfg, mode: str, source: str, adapter_dir: Optional[Path], device):
    """The base in `mode` (with the adapter for the mode it was trained in), and whether the adapter is on it."""
    from finetune.adapter import load_adapter
    from finetune.model import load_base, upcast_frozen_weights

    if adapter_dir is not None and mode == cfg.quant.mode:
        model, _, _ = load_adapter(adapter_dir, device=device)
        return model, True
    quant = dataclasses.replace(cfg.quant, mode=mode)
    return upcast_frozen_weights(load_base(cfg.model, quant, source, device), quant, cfg.speed.fp32_frozen), False


def perplexity_rows(cfg, args: Args, source: str, adapter_dir, rows, tokenizer, device) -> list[dict[str, Any]]:
    results = []
    batch_size = args.batch_size or cfg.train.batch_size
    for mode in args.modes or [cfg.quant.mode]:
        model, with_adapter = _load(cfg, mode, source, adapter_dir, device)
        if with_adapter:
            with model.disable_adapter():
                measured = [("base", *mean_nll(model, rows, tokenizer, cfg, device, batch_size, f"{mode} base"))]
            measured.append(("base+adapter",
                             *mean_nll(model, rows, tokenizer, cfg, device, batch_size, f"{mode} base+adapter")))
        else:
            measured = [("base", *mean_nll(model, rows, tokenizer, cfg, device, batch_size, f"{mode} base"))]
        for name, loss, tokens in measured:
            results.append({"model": name, "quant": mode, "loss": loss, "perplexity": perplexity(loss),
                            "target_tokens": tokens})
        del model
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<14} {'quant':<6} {'loss':>8} {'perplexity':>11} {'tokens':>8}"]
    for r in results:
        lines.append(f"{r['model']:<14} {r['quant']:<6} {r['loss']:>8.4f} {r['perplexity']:>11.3f} "
                     f"{r['target_tokens']:>8}")
    return "\n".join(lines)


def run_tasks(cfg, args: Args, source: str, adapter_dir, tokenizer, device, manager) -> dict[str, Any]:
    """lm-eval benchmark results of the base and (with an adapter) of base + adapter, per task and metric."""
    model, with_adapter = _load(cfg, cfg.quant.mode, source, adapter_dir, device)
    batch_size = args.batch_size or cfg.train.batch_size
    out = {}
    if with_adapter:
        with model.disable_adapter():
            out["base"] = evaluate_tasks(model, tokenizer, args.tasks, args.limit, manager, batch_size)
        out["base+adapter"] = evaluate_tasks(model, tokenizer, args.tasks, args.limit, manager, batch_size)
    else:
        out["base"] = evaluate_tasks(model, tokenizer, args.tasks, args.limit, manager, batch_size)
    return out


def task_manager(tasks: list[str], task_path: Optional[str]):
    """lm-eval's task index (with the task definitions under task_path); unknown names fail before weights load."""
    from lm_eval.tasks import TaskManager

    if task_path and not Path(task_path).is_dir():
        raise EvaluateError(f"task_path={task_path!r} is not a folder: point it at the folder holding the task YAML")
    manager = TaskManager(include_path=task_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvaluateError(f"lm-eval knows no task {', '.join(unknown)}: check the names (lm-eval ls tasks), "
                            "or point task_path= at the folder holding their YAML")
    return manager


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: Optional[int], manager,
                   batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-evaluation-harness on this (quantized, maybe adapted) model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # HFLM takes a loaded model as `pretrained` (a PeftModel too) and runs it where it already is.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager)["results"]
    return {task: {metric.split(",")[0]: float(value) for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and "stderr" not in metric}
            for task, metrics in results.items()}


def tasks_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'model':<14} {'task':<24} {'metric':<18} {'value':>8}"]
    for name, tasks in results.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                lines.append(f"{name:<14} {task:<24} {metric:<18} {value:>8.4f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise EvaluateError("tasks= runs lm-evaluation-harness, which is not installed: "
                                    "pip install 'finetune[eval]' (or pip install lm-eval)")
            if args.modes and len(args.modes) > 1:
                raise EvaluateError("tasks= evaluates one model: give at most one quant.mode")
    except EvaluateError as e:
        print(f"finetune.evaluate: {e}", file=sys.stderr)
        return 2
    return _evaluate(args)


def _evaluate(args: Args) -> int:
    import torch
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.atomic import CheckpointError, write_json_atomic
    from finetune.config import ConfigError
    from finetune.data import DataError
    from finetune.quant import saved_quantization
    from finetune.source import default_cache_dir, load_tokenizer, resolve_model_source

    try:
        cfg, adapter_dir = build_config(args)
        if args.tasks and args.modes and args.modes[0] != cfg.quant.mode:
            # The adapter was trained on another mode: benchmark that mode's base alone.
            cfg.quant = dataclasses.replace(cfg.quant, mode=args.modes[0])
            adapter_dir = None
        source = resolve_model_source(cfg.model, default_cache_dir(), seed=cfg.train.seed)
        if saved_quantization(source) is not None and args.modes and len(args.modes) > 1:
            raise EvaluateError(f"{source} is saved already quantized and loads only as saved: "
                                "drop quant.mode=... or use the unquantized base")
        tokenizer = load_tokenizer(cfg.model, source)
        rows, described = (None, "") if args.tasks else held_out(cfg, tokenizer, args)
        manager = task_manager(args.tasks, args.task_path) if args.tasks else None
    except (EvaluateError, ConfigError, DataError, CheckpointError, HydraException, OmegaConfBaseException) as e:
        kind = {DataError: "data", CheckpointError: "adapter"}.get(type(e), "config")
        print(f"finetune.evaluate {kind} error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    report: dict[str, Any] = {"adapter": str(adapter_dir) if adapter_dir else None, "base": cfg.model.name_or_path,
                              "trained_quant": cfg.quant.mode if adapter_dir else None}
    if args.tasks:
        report["tasks"] = run_tasks(cfg, args, source, adapter_dir, tokenizer, device, manager)
        print(f"\nlm-eval on {cfg.model.name_or_path} ({cfg.quant.mode})"
              + (f", limit {args.limit}" if args.limit else "") + "\n" + tasks_table(report["tasks"]))
    else:
        report["data"] = {"source": described, "rows": len(rows)}
        report["results"] = perplexity_rows(cfg, args, source, adapter_dir, rows, tokenizer, device)
        print(f"\nheld-out data: {described}, {len(rows)} rows\n{table(report['results'])}")
    out = Path(args.out) if args.out else (adapter_dir.parent / "evaluation.json"
                                             if adapter_dir is not None and adapter_dir.name == "adapter" else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
