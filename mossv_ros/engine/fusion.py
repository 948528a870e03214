# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""Fused projections: q/k/v of every self-attention layer and gate/up of every MLP as one
bias-free linear layer each (``moss_qkv``, ``moss_gate_up``), so a decode step runs one GEMM
where the stock layers run three or two (docs/model.md section 10.3).

The fused linear's weight is the stock weights' rows concatenated in order. Unquantized, the
stock linears stay and their weights become views of the fused one (no second copy: the
training path and the tests still call them). Quantized, the fused linear is what is
quantized, and the stock linears are replaced by :class:`FusedAway` (the bytes exist once).
Per-output-row quantization (int8, fp8 per row) gives the same values either way: each row
keeps its own scale. The streaming load (:mod:`.checkpoint`) fills the fused weight row block
by row block as the stock tensors arrive, before quantizing it.
"""
from typing import Iterator, List, Tuple

import torch
from torch import nn

#: (sub-module of a decoder layer, fused linear's name, the stock linears in row order)
FUSED = (('self_attn', 'moss_qkv', ('q_proj', 'k_proj', 'v_proj')),
         ('mlp', 'moss_gate_up', ('gate_proj', 'up_proj')))


class FusedAway(nn.Module):
    """Stands where a stock projection was fused into a quantized fused linear: holds no
    weight, and says so if called.

    :param fused_name: the fused linear's attribute name on the parent module.
    """

    def __init__(self, fused_name: str) -> None:
        super().__init__()
        self.fused_name = fused_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f'this projection was fused into {self.fused_name} (quantized '
                           'weights keep the fused layer only)')


def targets(text_model: nn.Module, cross_layer_ids) -> Iterator[Tuple[nn.Module, str,
                                                                      Tuple[str, ...]]]:
    """(parent module, fused name, stock names) of every fusion in the text model: q/k/v of
    the self-attention layers (cross layers take k/v from the vision cache), gate/up of every
    MLP."""
    for layer_id, layer in enumerate(text_model.layers):
        for attr, fused, stock in FUSED:
            if attr == 'self_attn' and layer_id in cross_layer_ids:
                continue
            yield getattr(layer, attr), fused, stock


def is_fused(text_model: nn.Module) -> bool:
    """True when the text model carries the fused linears."""
    return hasattr(text_model.layers[0].mlp, 'moss_gate_up')


def empty_fused(parent: nn.Module, fused: str, stock: Tuple[str, ...], device,
                dtype: torch.dtype) -> List[Tuple[str, int]]:
    """Give ``parent`` a fused linear with uninitialised storage on ``device`` (the streaming
    load fills it). :returns: (stock name, first row) of each stock linear's rows in it."""
    rows, starts = 0, []
    in_features = getattr(parent, stock[0]).in_features
    for name in stock:
        lin = getattr(parent, name)
        if lin.bias is not None or lin.in_features != in_features:
            raise ValueError(f'{name}: fusing needs bias-free projections of one input')
        starts.append((name, rows))
        rows += lin.out_features
    with torch.device('meta'):
        linear = nn.Linear(in_features, rows, bias=False)
    linear.weight = nn.Parameter(torch.empty(rows, in_features, device=device, dtype=dtype),
                                 requires_grad=False)
    setattr(parent, fused, linear)
    return starts


def finish(parent: nn.Module, fused: str, stock: Tuple[str, ...], keep_stock: bool) -> None:
    """After the fused weight is complete: the stock linears' weights become views of it
    (``keep_stock``), or the stock linears are replaced by :class:`FusedAway`."""
    weight = getattr(parent, fused).weight
    start = 0
    for name in stock:
        lin = getattr(parent, name)
        rows = lin.out_features
        if keep_stock:
            lin.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        else:
            setattr(parent, name, FusedAway(fused))
        start += rows


def fuse_in_memory(text_model: nn.Module, cross_layer_ids, keep_stock: bool = True) -> None:
    """Fuse a loaded text model's projections (their weights already on the device)."""
    with torch.no_grad():
        for parent, fused, stock in targets(text_model, cross_layer_ids):
            if hasattr(parent, fused):
                continue
            weight = getattr(parent, stock[0]).weight
            starts = empty_fused(parent, fused, stock, weight.device, weight.dtype)
            out = getattr(parent, fused).weight
            for (name, start) in starts:
                part = getattr(parent, name).weight
                out[start:start + part.shape[0]].copy_(part)
            finish(parent, fused, stock, keep_stock)
