"""Write a merged transformers folder as one GGUF file (llama.cpp, Ollama), with the `gguf` package's writer.

Supported: the llama-architecture families (Llama, SmolLM2, Mistral, Qwen2) with a byte-level BPE
("gpt2") tokenizer. Tensors are named by gguf's TensorNameMap, the q/k projections of llama-arch
models are permuted as llama.cpp's converter does (its rope kernel expects that layout), 1-D
tensors (norms, biases) stay F32 as llama.cpp keeps them, and tensors are converted and written one
at a time (the writer's header is filled from shapes first), so memory stays about one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_TYPES = ("f16", "bf16", "q8_0")
# transformers model_type -> (gguf architecture, whether q/k are permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


class GGUFExportError(ValueError):
    """The model cannot be exported to GGUF as asked; the message says why and what is supported."""


def check_architecture(folder: str | Path) -> dict[str, Any]:
    """The model's config.json, if its architecture and tokenizer can be exported; else GGUFExportError."""
    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"format=gguf supports the llama-architecture families ({', '.join(sorted(ARCHITECTURES))}; "
                         f"SmolLM2 is llama), not model_type={model_type}; use format=hf and convert with llama.cpp's "
                         "convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise GGUFExportError(f"format=gguf does not write rope scaling ({rope.get('rope_type')}) yet; use format=hf")
    tokenizer = json.loads((Path(folder) / "tokenizer.json").read_text()) if (Path(folder) / "tokenizer.json").is_file() else {}
    if tokenizer and tokenizer.get("model", {}).get("type") != "BPE":
        raise GGUFExportError("format=gguf writes byte-level BPE (gpt2-style) tokenizers only; this model's is "
                         f"{tokenizer.get('model', {}).get('type')}; use format=hf")
    return config


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rope: each head's two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _converted(w: torch.Tensor, qtype, gguf) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    data = w.float().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, gguf):
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    if wanted == Q.Q8_0 and shape[-1] % 32:
        return Q.F16  # Q8_0 blocks are 32 values of a row; llama.cpp falls back the same way
    return wanted


def _nbytes(shape: tuple[int, ...], qtype, gguf) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _add_tokenizer(writer, folder: Path, gguf) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def export_gguf(folder: Path, path: Path, gguf_type: str = "f16", *, log: Callable[[str], None] = print) -> Path:
    """Write the merged model in `folder` (a transformers folder) as the GGUF file `path`."""
    import gguf
    from safetensors import safe_open

    from finetune.source import safetensors_files

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type={gguf_type} is not one of {', '.join(GGUF_TYPES)}")
    config = check_architecture(folder)
    model_type = config["model_type"]
    arch_name, permute = ARCHITECTURES[model_type]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    names = gguf.get_tensor_name_map(arch, n_layers)
    rope = config.get("rope_parameters") or {}

    writer = gguf.GGUFWriter(str(path), arch_name)
    # transformers reads a llama-arch file as Mistral only when the name says so.
    writer.add_name(f"{model_type}-merged" if model_type != "mistral" else "mistral-merged")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    _add_tokenizer(writer, folder, gguf)

    # Pass 1: names, shapes and types for the header; pass 2 converts and writes one tensor at a time.
    files = safetensors_files(str(folder))
    plan = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise GGUFExportError(f"tensor {name} has no GGUF name for {arch_name}; it cannot be exported")
                shape = tuple(st.get_slice(name).get_shape())
                qtype = _tensor_type(gname, shape, gguf_type, gguf)
                plan.append((f, name, gname, shape, qtype))
                writer.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qtype, gguf), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for f, name, _gname, _shape, qtype in plan:
        with safe_open(str(f), framework="pt") as st:
            w = st.get_tensor(name)
        if permute and name.endswith("q_proj.weight"):
            w = _permute(w, n_head)
        elif permute and name.endswith("k_proj.weight"):
            w = _permute(w, n_kv)
        writer.write_tensor_data(_converted(w, qtype, gguf))
    writer.close()
    log(f"[gguf] wrote {path.name}: {len(plan)} tensors, {gguf_type}, {path.stat().st_size / 2**20:,.1f} MiB")
    return path
