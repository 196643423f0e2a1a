"""Optional speed machinery: none of it changes what a step computes (fused_lora: the same dropout
distribution, other draws), only how fast or in how much memory; except fp8, which rounds the frozen
matmuls' inputs to e4m3 (off by default).

    compile.py    torch.compile of each decoder block, per batch width; which blocks keep their
                  activations (speed.blocks_without_checkpointing); CUDA graphs (speed.cuda_graphs)
    recompute.py  what a compiled block keeps for backward and what it recomputes
    alibi.py      BLOOM's ALiBi attention through fused SDPA / FlexAttention kernels
    long_context.py  the MLP run in slices of the sequence (speed.mlp_chunk_size) and checkpointed
                  block inputs kept in CPU memory (speed.offload_checkpoints)
    host_embeddings.py  the frozen input embeddings in pinned CPU memory (speed.offload_embeddings)
    fused_lora.py LoRA's down-projection and dropout in Triton kernels, lora_kernels.py (speed.fused_lora)
    fp8.py        the frozen 4-bit layers' matmuls in FP8 inside fused_lora's layer op (speed.fp8_frozen_matmuls)

Each is tested on the CPU against the plain path (tests/test_loss.py, test_recompute.py,
test_attention.py, test_long_context.py, test_fused_lora.py, test_fp8.py). `apply_speed` is the one call the model builder makes.
"""

from finetune.speed.compile import apply_speed, batch_widths

__all__ = ["apply_speed", "batch_widths"]
