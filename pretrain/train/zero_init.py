"""Building the model: whole on every rank, or (ZeRO-3) partitioned as it is constructed, so that no rank ever holds
the full fp32 model.

Under `deepspeed.zero.Init` each submodule's parameters are partitioned as soon as its constructor returns. Two
things make the partitioned build give exactly the weights of the whole one for the same seed:

- tensors are created as the constructors ask (fp32, on the CPU, `tensor_overrides=[]`), so the constructors'
  own random draws (nn.Linear's default reset) come from the same CPU generator in the same order;
- the paper's initialisation, which the top-level constructor cannot run on partitioned parameters, runs afterwards
  parameter by parameter, each gathered whole (`VisionTransformer.init_weights(whole=...)`), in the same order.

The shards are then cast to the compute dtype, as DeepSpeed casts a whole model (its fp32 master copy is made from
the bf16 weights in both cases).
"""

from __future__ import annotations

import dataclasses

import torch

from pretrain.config import BatchPlan, Config
from pretrain.models.vit import VisionTransformer, ViTArgs, create_vit
from pretrain.train.engine import autocast_dtype, deepspeed_config


def partitioned_build(cfg: Config) -> bool:
    """True when the model is built partitioned: ZeRO-3 with `deepspeed.zero_init` on."""
    return cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init


def build_model(cfg: Config, args: ViTArgs, plan: BatchPlan, *, device: torch.device) -> VisionTransformer:
    """The ViT of `args`, initialised from the global RNG (seed it first), whole or partitioned (see module doc)."""
    if not partitioned_build(cfg):
        return create_vit(cfg.model.name, **dataclasses.asdict(args))
    import deepspeed

    ds = deepspeed_config(plan, cfg.train, cfg.optim, cfg.deepspeed, on_cuda=device.type == "cuda")
    # mem_efficient_linear=False: DeepSpeed would otherwise replace F.linear process-wide, for good
    with deepspeed.zero.Init(config_dict_or_path=ds, tensor_overrides=[], mem_efficient_linear=False):
        model = VisionTransformer(args, init=False)
    model.init_weights(whole=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    cast_partitions(model, autocast_dtype(cfg.train.precision))
    return model


def cast_partitions(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every ZeRO-3 parameter's shard to `dtype` (DeepSpeed casts only models it did not partition itself)."""
    for p in model.parameters():
        p.ds_tensor.data = p.ds_tensor.data.to(dtype)
        p.data = torch.empty(0, dtype=dtype, device=p.data.device)  # the partitioned placeholder, as DeepSpeed makes
