"""Regional `torch.compile`: each transformer block is compiled on its own (as torchtitan and OpenCLIP do), never the
DeepSpeed engine or the whole model.

One block's graph is compiled once and reused by every block of the same shape, so compile time does not grow with
depth; the patch embedding, head, loss and DeepSpeed's hooks and collectives stay eager. Gradient checkpointing
wraps the compiled block (`checkpoint(block, x)` in the model), so recomputation reruns the compiled code.

ZeRO-3 gathers parameters in forward hooks of every module. Each block is made a ZeRO-3 *leaf* module, so that its
parameters are gathered at once by the block's own hook, which runs outside the compiled region (`block.forward`
is compiled, not `block.__call__`); inside, there are no hooks and the block compiles to one graph (`fullgraph`) at
every stage.
"""

from __future__ import annotations

import torch

from pretrain.models.vit import VisionTransformer


def compile_blocks(model: VisionTransformer, zero_stage: int) -> None:
    """Compile `model`'s blocks in place (parameter names unchanged: checkpoints and export do not see it).

    Call before `deepspeed.initialize`, which installs the ZeRO-3 hooks on the modules it finds.
    """
    if zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(model.blocks[0])])
    for block in model.blocks:
        block.forward = torch.compile(block.forward, fullgraph=True)
