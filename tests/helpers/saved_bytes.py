"""Bytes autograd keeps for backward: a deterministic stand-in for activation memory (no RSS, no timing)."""

from __future__ import annotations

import torch


def saved_for_backward_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward of `model(x)`, parameters excluded,
    as its saved-tensor hooks see them (checkpointed blocks save through their own hooks and are not seen)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().sum().backward()
    return sum(saved.values())
