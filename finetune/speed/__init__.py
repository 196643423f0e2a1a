"""Optional speed machinery: none of it changes what a step computes, only how fast or in how much memory.

    compile.py    torch.compile of each decoder block, per batch width; which blocks keep their
                  activations (speed.blocks_without_checkpointing); CUDA graphs (speed.cuda_graphs)
    recompute.py  what a compiled block keeps for backward and what it recomputes
    alibi.py      BLOOM's ALiBi attention through fused SDPA / FlexAttention kernels

Each is tested on the CPU against the plain path (tests/test_loss.py, test_recompute.py,
test_attention.py). `apply_speed` is the one call the model builder makes.
"""

from finetune.speed.compile import apply_speed, batch_widths

__all__ = ["apply_speed", "batch_widths"]
