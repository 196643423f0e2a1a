"""BLOOM's fused ALiBi attention (sdpa, flex_attention) against transformers' eager path, on the GPU.

    python scripts/attention_check.py            # CUDA, bf16, a 4-layer BLOOM with random weights

For each implementation: the loss and every weight gradient of a right-padded batch, relative to
eager, and whether greedy generation with a KV cache gives the same tokens. The CPU tests
(tests/test_attention.py) cover sdpa training and flex's forward; FlexAttention trains on GPUs only.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.speed.alibi import use_fused_alibi_attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.for_model("bloom", vocab_size=4096, hidden_size=512, n_layer=4, n_head=8)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager",
                                                 dtype=torch.bfloat16).to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    for row in range(1, args.batch):  # rows of different lengths, right-padded as the collator pads
        mask[row, args.seq - row * args.seq // (2 * args.batch):] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    def greedy(model):
        prompt = ids[:1, :32]
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                  do_sample=False, pad_token_id=0)

    ref_loss, ref_grads = loss_and_grads(reference)
    ref_tokens = greedy(reference.eval())
    print(f"eager: loss {ref_loss:.5f}")
    for implementation in ["sdpa", "flex_attention"] if device.type == "cuda" else ["sdpa"]:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager",
                                                 dtype=torch.bfloat16).to(device)
        model.load_state_dict(reference.state_dict())
        use_fused_alibi_attention(model, implementation)
        model.train()
        loss, grads = loss_and_grads(model)
        rel = ((grads - ref_grads).norm() / ref_grads.norm()).item()
        tokens = greedy(model.eval())
        same = int((tokens == ref_tokens).sum()) - 32
        print(f"{implementation}: loss {loss:.5f} (|diff| {abs(loss - ref_loss):.5f}), gradient relative error "
              f"{rel:.4f}, greedy generation: {same}/32 new tokens equal to eager's")


if __name__ == "__main__":
    main()
