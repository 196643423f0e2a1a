"""Generate with llama.cpp from our GGUF export and with transformers from the merged folder, side by side.

    pip install .[llamacpp]              # llama-cpp-python: builds llama.cpp (CMAKE_ARGS="-DGGML_NATIVE=OFF")
    python scripts/gguf_llamacpp_check.py [--model MERGED_DIR] [--types f16,q8_0] [--tokens 32]

--model is a merged folder (python -m finetune.merge); by default the embedded SmolLM2-135M-Instruct
(a plain transformers folder of the llama family). Each type is exported with finetune.gguf_export
and loaded by llama.cpp. For each prompt (rendered with the chat template, token ids from the
transformers tokenizer, fed to both sides) it prints both greedy continuations, the fraction of
positions where the two token sequences agree, whether llama.cpp's own tokenizer (from the GGUF
metadata) gives the same prompt ids, and the max |logit difference| at the last prompt token.
Exit code 1 when llama.cpp's f16 generations agree on less than --min-agree of the tokens.
llama-cpp-python is used when installed, else llama-cpp-py-sync (a binary wheel, where its library
loads: it needs glibc 2.38).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
]


class LlamaCpp:
    """A GGUF file loaded by llama.cpp through whichever Python bindings are installed."""

    def __init__(self, path: Path):
        threads = min(4, os.cpu_count() or 1)
        try:
            import llama_cpp

            self.kind, self.version = "llama-cpp-python", llama_cpp.__version__
            self.llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
        except ImportError:
            import llama_cpp_py_sync

            self.kind, self.version = "llama-cpp-py-sync", llama_cpp_py_sync.__llama_cpp_tag__
            self.llm = llama_cpp_py_sync.Llama(str(path), n_ctx=512, n_threads=threads, seed=0, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization (from the GGUF's tokenizer metadata), special tokens parsed."""
        if self.kind == "llama-cpp-python":
            return self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return self.llm.tokenize(text, add_special=False, parse_special=True)

    def _start(self, ids: list[int]) -> np.ndarray:
        if self.kind == "llama-cpp-python":
            self.llm.reset()
            self._past = 0
        else:
            self.llm._clear_context_state()
            self._past = 0
        return self._feed(ids)

    def _feed(self, ids: list[int]) -> np.ndarray:
        """Evaluate `ids` after what was fed before; the logits at the last one."""
        if self.kind == "llama-cpp-python":
            self.llm.eval(ids)
            return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
        self._past = self.llm._eval_tokens(list(ids), self._past)
        pointer = self.llm._lib.llama_get_logits_ith(self.llm._ctx, -1)
        return np.frombuffer(self.llm._ffi.buffer(pointer, self.llm.n_vocab * 4), dtype=np.float32).copy()

    def greedy(self, ids: list[int], tokens: int, stop: set[int]) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of `ids` by argmax of llama.cpp's logits (no sampler), and the logits
        at the last prompt token."""
        first = logits = self._start(ids)
        out: list[int] = []
        for _ in range(tokens):
            token = int(logits.argmax())
            if token in stop:
                break
            out.append(token)
            logits = self._feed([token])
        return out, first


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions where both sequences hold the same token, length of the longer one)."""
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b), 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a merged transformers folder (default: the embedded SmolLM2)")
    p.add_argument("--types", default="f16,q8_0", help="GGUF types to export and compare (f16, bf16, q8_0)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--work", type=Path, help="where to write the GGUF files (default: a temporary folder)")
    p.add_argument("--min-agree", type=float, default=0.9, help="least fraction of equal f16 tokens for exit code 0")
    args = p.parse_args()
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("llama_cpp", "llama_cpp_py_sync")):
        print("gguf_llamacpp_check: no llama.cpp bindings; run `pip install llama-cpp-python` (or llama-cpp-py-sync)",
              file=sys.stderr)
        return 2
    types = [t for t in args.types.split(",") if t]
    from finetune.gguf_export import GGUF_TYPES, export_gguf

    if bad := [t for t in types if t not in GGUF_TYPES]:
        print(f"gguf_llamacpp_check: --types {','.join(bad)} not among {', '.join(GGUF_TYPES)}", file=sys.stderr)
        return 2
    if args.model is None:
        from finetune.embedded import ensure_embedded_model
        from finetune.source import default_cache_dir

        args.model = ensure_embedded_model("embedded:smollm2-135m-instruct", default_cache_dir())
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="gguf_llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    eos = GenerationConfig.from_pretrained(args.model).eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    prompts = []
    for text in PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        prompts.append((text, rendered, tokenizer(rendered, add_special_tokens=False)["input_ids"]))
    hf = {}
    with torch.no_grad():
        for text, _, ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens,
                                 do_sample=False, eos_token_id=sorted(stop), pad_token_id=tokenizer.pad_token_id or 0)
            hf[text] = ([t for t in out[0, len(ids):].tolist() if t not in stop], model(x).logits[0, -1].numpy())
    worst = 1.0
    for gguf_type in types:
        path = export_gguf(Path(args.model), work / f"model-{gguf_type}.gguf", gguf_type, log=lambda s: None)
        llm = LlamaCpp(path)
        if gguf_type == types[0]:
            print(f"model {args.model}; llama.cpp through {llm.kind} {llm.version}; greedy, {args.tokens} new tokens")
        equal = total = 0
        print(f"\n=== {gguf_type}: {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        for text, rendered, ids in prompts:
            own = llm.tokenize(rendered)
            ours, logits = llm.greedy(ids, args.tokens, stop)
            theirs, hf_logits = hf[text]
            e, n = agreement(ours, theirs)
            equal, total = equal + e, total + n
            print(f"prompt: {text!r}  (llama.cpp tokenizer gives the same {len(ids)} prompt ids: {own == ids}; "
                  f"max |dlogit| at the last prompt token {np.abs(logits - hf_logits).max():.4f})")
            print(f"  transformers  {tokenizer.decode(theirs)!r}")
            print(f"  llama.cpp     {tokenizer.decode(ours)!r}")
            print(f"  equal tokens  {e}/{n}")
        del llm
        print(f"{gguf_type}: {equal}/{total} = {equal / total:.1%} of greedy tokens equal")
        if gguf_type == "f16":
            worst = equal / total
    return 0 if worst >= args.min_agree else 1


if __name__ == "__main__":
    sys.exit(main())
