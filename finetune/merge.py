"""`python -m finetune.merge adapter=RUN_DIR out=DIR`: merge a LoRA adapter into its base and export it.

The merged weight of every adapted linear layer is `base + scale * B @ A`, computed in fp32, where
`base` is either the dequantized 4-bit (or 8-bit) weight the adapter was trained against
(`base=dequantized`, the default) or the original 16-bit weight (`base=original`). The base is
streamed tensor by tensor from its safetensors files and the output is written in shards, so the
peak memory is about one tensor in fp32 beyond the shard being written. Every merge ends with a
parity report (finetune.parity) that compares the merged model with the adapter it came from.

Keys: adapter (run or adapter folder), out (a new folder), base (dequantized | original), dtype
(bfloat16 | float16 | float32; default: the run's compute dtype), format (hf | gguf), gguf_type
(f16 | bf16 | q8_0), prompts (a text file, one prompt per line; default: the run's eval rows),
parity_rows (8), max_shard_size (bytes or 2GB/500MB), device (auto | cpu | cuda | cuda:N; auto: the GPU
when there is one), push_to_hub (a repo id; needs the network).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

BASES = ("dequantized", "original")
FORMATS = ("hf", "gguf")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 2 * 10**9
MERGED_KIND = "finetune-merged-model"
KEYS = {
    "adapter": None, "out": None, "base": "dequantized", "dtype": None, "format": "hf", "gguf_type": "f16",
    "prompts": None, "parity_rows": "8", "max_shard_size": "2GB", "device": "auto", "push_to_hub": None,
}
PEFT_PREFIX = "base_model.model."
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message says how to fix it (exit 2)."""


def device_problem(spec: str) -> Optional[str]:
    """Why `device=spec` cannot be used here, or None."""
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if spec in ("auto", "cpu"):
        return None
    if not m:
        return f"device={spec} is not a device; use device=auto (the GPU when there is one), cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"device={spec} but this machine has no CUDA GPU that torch can use; use device=cpu (or device=auto)"
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        return f"device={spec} but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
    return None


def resolve_device(spec: str) -> torch.device:
    """The torch device of a valid `device=` value (auto: cuda:0 when a GPU is there, else cpu)."""
    if problem := device_problem(spec):
        raise MergeError(problem)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device("cuda", int(spec.partition(":")[2] or 0)) if spec.startswith("cuda") else torch.device("cpu")


# ---------------------------------------------------------------------------------------- the adapter


@dataclass
class LoraDelta:
    """One adapted linear layer: its LoRA matrices and PEFT's scaling of B @ A."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        """scale * B @ A in fp32, in the layout of the base weight (out_features, in_features)."""
        d = (self.B.float() @ self.A.float()) * self.scale
        return d.T if self.fan_in_fan_out else d


@dataclass
class AdapterParts:
    """An adapter file split into LoRA deltas (by base weight name) and whole replaced tensors
    (modules_to_save and trained biases, by base tensor name)."""

    deltas: dict[str, LoraDelta]
    replaced: dict[str, torch.Tensor]
    config: dict[str, Any]


def lora_scale(adapter_config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling for `module`: alpha / r, or alpha / sqrt(r) with use_rslora; per-module patterns apply."""
    from peft.utils.other import get_pattern_key

    alpha = adapter_config["lora_alpha"]
    patterns = adapter_config.get("alpha_pattern") or {}
    if patterns:
        alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def _base_name(key: str) -> str:
    """The base model's tensor name of an adapter-file key (PEFT's prefix and wrappers removed)."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")


def read_adapter_parts(adapter_dir: Path) -> AdapterParts:
    """The adapter's tensors, grouped by the base weight each one changes."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "lora_bias", "use_qalora") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise MergeError(f"{adapter_dir} is a {config.get('peft_type')} adapter with {unsupported or 'no LoRA'}: "
                         "only plain LoRA adapters (what finetune trains) can be merged here")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = re.match(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            pairs.setdefault(_base_name(m.group(1)), {})[m.group(2)] = value
        elif ".lora_" in key:
            raise MergeError(f"{adapter_dir}: adapter tensor {key} is of a kind this merge does not know")
        else:
            replaced[_base_name(key)] = value
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{adapter_dir}: {module} has lora_{next(iter(ab))} but not its partner; the adapter is incomplete")
        deltas[f"{module}.weight"] = LoraDelta(ab["A"], ab["B"], lora_scale(config, module, ab["A"].shape[0]),
                                               bool(config.get("fan_in_fan_out")))
    return AdapterParts(deltas, replaced, config)


# ------------------------------------------------------------------------------------ the 4-bit weights


def quantized_linear_names(source: str, cfg) -> set[str]:
    """Module names that transformers quantizes when it loads `source` with the run's quant settings.

    The same rule as transformers' bitsandbytes quantizer: every plain nn.Linear except the modules
    it keeps unquantized by default (output head, tied weights) or quant.int8_skip_modules, plus
    the model's own keep-in-fp32 modules.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    from finetune.model import kept_unquantized_by_default
    from finetune.quant import build_bnb_config
    from finetune.source import meta_model

    if cfg.quant.mode not in ("nf4", "fp4", "int8"):
        return set()
    meta = meta_model(source, cfg.model)
    keep = kept_unquantized_by_default(meta) if cfg.quant.int8_skip_modules else None
    skip = build_bnb_config(cfg.quant, keep).llm_int8_skip_modules
    not_convert = list(kept_unquantized_by_default(meta) if skip is None else skip)
    not_convert += list(getattr(meta, "_keep_in_fp32_modules", None) or [])
    return {
        name for name, module in meta.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, not_convert)
    }


def dequantized_weight(weight: torch.Tensor, quant) -> torch.Tensor:
    """The weight the quantized layer computes with, in fp32: quantize as bitsandbytes does on load, then dequantize.

    4-bit: the weight in the compute dtype is quantized with the recorded type, block size 64 and
    double quantization (bitsandbytes' Params4bit._quantize), and dequantized with its quant state.
    8-bit: row-wise absmax int8 of the fp16 weight (Int8Params._quantize), times SCB / 127; the weight
    reaches fp16 through the compute dtype, as transformers loads it. Both run on the device `weight`
    is on, with that device's bitsandbytes kernels, as the quantized layers do on load there.
    """
    import bitsandbytes.functional as F

    from finetune.quant import torch_dtype

    if quant.mode in ("nf4", "fp4"):
        w = weight.to(torch_dtype(quant.compute_dtype)).contiguous()
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=quant.double_quant,
                                        quant_type=quant.mode, quant_storage=torch_dtype(quant.quant_storage))
        return F.dequantize_4bit(packed, state).float()
    if quant.mode == "int8":
        w = weight.to(torch_dtype(quant.compute_dtype)).to(torch.float16).contiguous()
        cb, scb, _ = F.int8_vectorwise_quant(w)
        return F.int8_vectorwise_dequant(cb, scb).float()
    raise MergeError(f"quant.mode={quant.mode} has no quantized weights; merge with base=original")


# --------------------------------------------------------------------------------- streaming the base


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of a safetensors file, in file order, one at a time.

    Plain reads, not a memory map: pages of a mapped file stay in the process's resident memory
    until it is unmapped, so a single-file base would be counted whole in the merge's peak.
    """
    with open(path, "rb", buffering=0) as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise MergeError(f"{path}: tensor {name} has dtype {info['dtype']}, which the merge cannot read")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            if end == start:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            buffer = bytearray(end - start)
            view, done = memoryview(buffer), 0
            f.seek(8 + size + start)
            while done < len(buffer):
                n = f.readinto(view[done:])
                if not n:
                    raise MergeError(f"{path} ends inside tensor {name}: the file is truncated")
                done += n
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def merged_tensors(
    source: str,
    parts: AdapterParts,
    *,
    base: str,
    quant,
    quantized: set[str],
    dtype: torch.dtype,
    device: Optional[torch.device] = None,
    scale: Optional[Callable[[str, LoraDelta], float]] = None,
    skip_replaced: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor in `dtype`, on the CPU) for every tensor of the base, one at a time.

    Each tensor is re-quantized, dequantized and merged on `device`, then brought back, so the
    device holds about one tensor at a time. `scale` and `skip_replaced` exist to plant merge bugs
    in tests (a wrong LoRA scaling, a merge that forgets modules_to_save); the parity report must
    catch both.
    """
    from finetune.source import safetensors_files

    device = device or torch.device("cpu")
    used_deltas, used_replaced = set(), set()
    for path in safetensors_files(source):
        for name, tensor in read_safetensors(path):
            if name in parts.replaced and not skip_replaced:
                used_replaced.add(name)
                yield name, parts.replaced[name].to(dtype)
                continue
            module = name.rsplit(".", 1)[0]
            quantize = base == "dequantized" and name.endswith(".weight") and module in quantized
            if not quantize and name not in parts.deltas:
                yield name, tensor.to(dtype)
                continue
            tensor = tensor.to(device)
            if quantize:
                tensor = dequantized_weight(tensor, quant)
            if name in parts.deltas:
                used_deltas.add(name)
                d = parts.deltas[name]
                s = d.scale if scale is None else scale(name, d)
                d = dataclasses.replace(d, A=d.A.to(device), B=d.B.to(device), scale=s)
                tensor = tensor.float() + d.delta()
            yield name, tensor.to(dtype).cpu()
            del tensor
    missing = (set(parts.deltas) - used_deltas) | (set() if skip_replaced else set(parts.replaced) - used_replaced)
    tied_head = {n for n in missing if n in parts.replaced}
    for name in sorted(tied_head):  # a replaced output head of a model with tied embeddings is written on its own
        yield name, parts.replaced[name].to(dtype)
    missing -= tied_head
    if missing:
        raise MergeError(f"the adapter changes {sorted(missing)[:3]} ({len(missing)} in all), which the base at {source} "
                         "does not have: the adapter was trained on another model")


def parse_size(text: str) -> int:
    """Bytes from "2GB", "500MB", "64KB" or a plain number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|MB|KB|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MergeError(f"max_shard_size={text} is not a size; write e.g. max_shard_size=2GB or max_shard_size=500MB")
    unit = {"gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}[(m.group(2) or "b").lower()]
    return int(float(m.group(1)) * unit)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Write tensors as safetensors shards of at most `max_shard_bytes` (one tensor per shard if larger)
    and the index; returns {"shards", "bytes", "tensors"}."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes, written, files, weight_map = 0, 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        written += size
    if shard:
        flush()
    # The standard names: model.safetensors alone, or model-0000i-of-0000n.safetensors with an index.
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
    else:
        final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
        for old, new in final.items():
            (folder / old).rename(folder / new)
        index = {"metadata": {"total_size": written}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": len(files), "bytes": written, "tensors": len(weight_map)}


# ------------------------------------------------------------------------------------ the merged folder


@dataclass
class MergeResult:
    out: Path
    base: str
    dtype: str
    shards: int
    bytes: int
    seconds: float
    peak_rss_gib: float
    parity: dict[str, Any] = field(default_factory=dict)
    gguf: Optional[Path] = None
    resources: dict[str, Any] = field(default_factory=dict)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib(device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated on `device` since its last reset, or None off the GPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def describe_resources(r: dict[str, Any]) -> list[str]:
    """The summary lines of the merge's time and peak memory."""
    gpu = "" if r["merge_peak_gpu_gib"] is None else f", GPU {r['merge_peak_gpu_gib']:.2f} GiB"
    lines = [f"merge         {r['merge_seconds']:.1f} s on {r['device']}; peak RSS {r['merge_peak_rss_gib']:.2f} GiB{gpu} "
             "(reading, merging and writing the weights)"]
    gpu = "" if r["peak_gpu_gib"] is None else f", GPU {r['peak_gpu_gib']:.2f} GiB"
    lines.append(f"whole command {r['seconds']:.1f} s; peak RSS {r['peak_rss_gib']:.2f} GiB{gpu} (with the parity check's model loads)")
    return lines


def write_model_files(folder: Path, source: str, cfg, dtype: torch.dtype, untie: bool) -> None:
    """config.json (no quantization_config), generation config, tokenizer and chat template."""
    from transformers import AutoConfig, GenerationConfig

    from finetune.source import load_tokenizer

    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    if untie:  # the adapter replaced the output head, which no longer equals the embeddings
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    load_tokenizer(cfg.model, source).save_pretrained(folder)


def model_card(manifest: dict[str, Any], cfg, base: str, dtype: str, parity: dict[str, Any]) -> str:
    """README.md of the merged model: base, adapter, data, settings and parity figures."""
    from finetune.quant import describe

    lines = [
        "---", "library_name: transformers", f"base_model: {manifest['base_model']}", "tags: [finetune, lora, merged]", "---",
        "", f"# Merged LoRA model ({base} base)", "",
        f"- base model: `{manifest['base_model']}` (weights from `{manifest['base_source']}`)",
        f"- adapter: `{manifest['adapter_dir']}` (step {manifest.get('step')})",
        f"- data: `{cfg.data.path}` (format {cfg.data.format})",
        f"- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, rslora={cfg.lora.use_rslora}, targets={list(cfg.lora.target_modules)}, "
        f"modules_to_save={list(cfg.lora.modules_to_save)}",
        f"- trained on: {describe(cfg.quant)}",
        f"- merge: base={base} (" + ("dequantized 4-bit/8-bit weights + LoRA delta: the model the adapter was trained against"
                                     if base == "dequantized" else "original 16-bit weights + LoRA delta") + f"), written in {dtype}",
        "", "## Parity (finetune.parity)", "", "```", parity.get("table", "(not run)"), "```", "",
    ]
    return "\n".join(lines)


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str = "dequantized",
    dtype: Optional[str] = None,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    format: str = "hf",
    gguf_type: str = "f16",
    prompts: Optional[list[str]] = None,
    parity_rows: int = 8,
    check_parity: bool = True,
    device: str = "auto",
    cache_dir: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> MergeResult:
    """Merge the adapter of a run (or adapter folder) into its base and write a transformers folder at `out`.

    `device` (auto, cpu, cuda, cuda:N) is where each tensor is re-quantized and merged and where the
    parity check runs its models. Raises MergeError for a merge that cannot be done and
    finetune.parity.ParityError when the merged model does not answer like the adapter; `out`
    appears only when everything passed.
    """
    from finetune.adapter import read_adapter_manifest, resolve_adapter_dir
    from finetune.atomic import atomic_directory
    from finetune.parity import parity_report
    from finetune.quant import saved_quantization
    from finetune.source import default_cache_dir, resolve_model_source, safetensors_files

    started = time.perf_counter()
    out = Path(out)
    problems = arg_problems(base=base, dtype=dtype, format=format, gguf_type=gguf_type, out=out, device=device)
    if problems:
        raise MergeError("\n  ".join(problems))
    where = resolve_device(device)
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    adapter_dir = resolve_adapter_dir(Path(adapter))
    manifest = read_adapter_manifest(adapter_dir)
    cfg = manifest.config
    source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
    if saved_quantization(source) is not None:
        raise MergeError(f"the base at {source} was saved already quantized (python -m finetune.quantize); the merge "
                         "reads 16-bit weights: train the adapter on the 16-bit base folder it was quantized from")
    if base == "dequantized" and cfg.quant.mode == "none":
        raise MergeError("the adapter was trained on an unquantized base (quant.mode=none): use base=original")
    if format == "gguf":
        from finetune.gguf_export import check_architecture

        check_architecture(source)
    dtype_name = dtype or (cfg.quant.compute_dtype if cfg.quant.compute_dtype in DTYPES else "bfloat16")
    torch_dtype = DTYPES[dtype_name]
    try:
        safetensors_files(source)  # the merge streams the base's safetensors, tensor by tensor
    except FileNotFoundError as e:
        raise MergeError(str(e)) from e
    parts = read_adapter_parts(adapter_dir)
    quantized = quantized_linear_names(source, cfg) if base == "dequantized" else set()
    info = {**manifest.data, "adapter_dir": str(adapter_dir)}
    record = {"kind": MERGED_KIND, "base": base, "dtype": dtype_name, "adapter": str(adapter_dir),
              "base_model": manifest.data["base_model"], "base_source": source}
    with atomic_directory(out, record) as tmp:
        log(f"[merge] merging {len(parts.deltas)} LoRA layers into {source} ({base} base, {dtype_name}, on {where}) ...")
        stats = write_shards(
            merged_tensors(source, parts, base=base, quant=cfg.quant, quantized=quantized, dtype=torch_dtype,
                           device=where),
            tmp, max_shard_size,
        )
        untie = any(n.startswith("lm_head.") for n in parts.replaced)
        write_model_files(tmp, source, cfg, torch_dtype, untie)
        resources: dict[str, Any] = {
            "device": str(where), "merge_seconds": time.perf_counter() - started,
            "merge_peak_rss_gib": peak_rss_gib(), "merge_peak_gpu_gib": peak_gpu_gib(where),
        }
        log(f"[merge] wrote {stats['tensors']} tensors in {stats['shards']} shard(s), {stats['bytes'] / 2**20:,.1f} MiB; "
            f"peak RSS {resources['merge_peak_rss_gib']:.2f} GiB"
            + ("" if where.type != "cuda" else f", peak GPU {resources['merge_peak_gpu_gib']:.2f} GiB"))
        report: dict[str, Any] = {}
        if check_parity:
            report = parity_report(tmp, adapter_dir, cfg, source, base=base, prompts=prompts, rows=parity_rows, log=log,
                                   device=where)
        (tmp / "README.md").write_text(model_card(info, cfg, base, dtype_name, report))
        gguf_path = None
        if format == "gguf":
            from finetune.gguf_export import export_gguf

            gguf_path = export_gguf(tmp, tmp / f"model-{gguf_type}.gguf", gguf_type, log=log)
        resources.update(seconds=time.perf_counter() - started, peak_rss_gib=peak_rss_gib(), peak_gpu_gib=peak_gpu_gib(where))
        saved = {**{k: v for k, v in report.items() if k != "table"}, "resources": resources}
        (tmp / "parity.json").write_text(json.dumps(saved, indent=2))
        if report.get("failures"):
            from finetune.parity import ParityError

            # Kept beside `out` so the reason can be read; the model folder itself never appears.
            failed = out.with_name(out.name + ".parity-failed.json")
            failed.write_text(json.dumps(saved, indent=2))
            raise ParityError(report["failures"], failed)
    gguf_final = out / gguf_path.name if gguf_path else None
    return MergeResult(out, base, dtype_name, stats["shards"], stats["bytes"], time.perf_counter() - started,
                       resources["merge_peak_rss_gib"], report, gguf_final, resources)


# ------------------------------------------------------------------------------------------------ CLI


def arg_problems(*, base: str, dtype: Optional[str], format: str, gguf_type: str, out: Path,
                 device: str = "auto") -> list[str]:
    """Everything wrong with the merge arguments, checked before any weights load."""
    from finetune.gguf_export import GGUF_TYPES

    p = []
    if base not in BASES:
        p.append(f"base={base} is not a merge target; use base=dequantized (the model the adapter was trained "
                 "against, the default) or base=original (the 16-bit weights)")
    if dtype is not None and dtype not in DTYPES:
        p.append(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
    if format not in FORMATS:
        p.append(f"format={format} is not one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        p.append(f"gguf_type={gguf_type} is not one of {', '.join(GGUF_TYPES)}")
    if problem := device_problem(device):
        p.append(problem)
    if out.exists():
        p.append(f"out={out} already exists; the merge never overwrites: pick a new folder or delete that one")
    return p


def parse_args(argv: list[str]) -> dict[str, str]:
    from finetune.cli import parse_key_values

    values, _, problems = parse_key_values(argv, KEYS)
    if "adapter" not in values:
        problems.append("adapter=RUN_DIR is required (the run folder printed at the end of training)")
    if "out" not in values:
        problems.append("out=DIR is required (a new folder for the merged model)")
    if not problems:
        problems += arg_problems(base=values["base"], dtype=values.get("dtype"), format=values["format"],
                                 gguf_type=values["gguf_type"], out=Path(values["out"]), device=values["device"])
        if not values["parity_rows"].isdigit() or int(values["parity_rows"]) < 1:
            problems.append(f"parity_rows={values['parity_rows']} must be a positive whole number")
        if "prompts" in values and not Path(values["prompts"]).is_file():
            problems.append(f"prompts={values['prompts']} is not a file; give a text file with one prompt per line")
        try:
            parse_size(values["max_shard_size"])
        except MergeError as e:
            problems.append(str(e))
    if problems:
        fail(["bad arguments:", *problems])
    return values


def fail(lines: list[str]) -> None:
    print("finetune.merge: " + "\n  ".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(2)


def push_problems(repo: str) -> list[str]:
    """Whether the hub can be reached for `push_to_hub`, checked before any work is done."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false"):
        return [f"push_to_hub={repo} needs the network but HF_HUB_OFFLINE is set: unset it, or leave push_to_hub "
                "out and upload the folder later with `hf upload`"]
    try:
        from huggingface_hub import HfApi

        HfApi().whoami()
    except Exception as e:  # any failure to reach or authenticate means no push
        return [f"push_to_hub={repo}: the hub cannot be reached or you are not logged in ({type(e).__name__}: "
                f"{str(e)[:200]}); run `hf auth login` online, or leave push_to_hub out"]
    return []


def main(argv: Optional[list[str]] = None) -> None:
    from finetune.atomic import CheckpointError
    from finetune.gguf_export import GGUFExportError
    from finetune.parity import ParityError

    values = parse_args(sys.argv[1:] if argv is None else argv)
    if "push_to_hub" in values and (problems := push_problems(values["push_to_hub"])):
        fail(problems)
    prompts = None
    if "prompts" in values:
        prompts = [line for line in Path(values["prompts"]).read_text().splitlines() if line.strip()]
    try:
        result = merge_adapter(
            values["adapter"], values["out"], base=values["base"], dtype=values.get("dtype"),
            max_shard_size=parse_size(values["max_shard_size"]), format=values["format"],
            gguf_type=values["gguf_type"], prompts=prompts, parity_rows=int(values["parity_rows"]),
            device=values["device"],
        )
    except (MergeError, GGUFExportError, CheckpointError) as e:
        fail([str(e)])
    except ParityError as e:
        fail([f"parity check FAILED: the merged model does not answer like the adapter; nothing was written to {values['out']}",
              *e.failures, f"the full report: {e.report_path}"])
    if "push_to_hub" in values:
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=values["push_to_hub"], folder_path=str(result.out))
    print("=" * 20 + " finetune.merge: done " + "=" * 38)
    print(f"merged model  {result.out} ({result.base} base, {result.dtype}, {result.shards} shard(s), "
          f"{result.bytes / 2**20:,.1f} MiB)")
    if result.gguf:
        print(f"gguf          {result.gguf}")
    for line in describe_resources(result.resources):
        print(line)
    print(f"load it       AutoModelForCausalLM.from_pretrained('{result.out}')")
    print("=" * 80, flush=True)


if __name__ == "__main__":
    main()
