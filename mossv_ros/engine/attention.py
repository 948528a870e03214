"""Attention of the text step: masked, grouped-KV, static shapes, and the kernel each call
site may use (docs/model.md sections 4.6 and 10.3).
"""
import inspect

import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

#: SDPA backends of every call site: all but cuDNN, which PyTorch prefers on Hopper and
#: which re-plans for every new key length (docs/model.md section 10.3); flash takes no mask
#: and steps aside for the memory-efficient kernel on CUDA, math is the last resort
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
#: query rows per KV head (query heads x tokens) up to which attention runs as two matmuls
#: and a float32 softmax: a decode step's handful of rows gives SDPA's kernels too little to
#: spread over the GPU (H200, 11B, 256 frames cached, CUDA graph: 9.2 ms per step against 22.4
#: with the memory-efficient kernel, bench/results/gpu.json); longer prefills take SDPA
MATMUL_MAX_ROWS = 32
#: the backends' order is a preference where this PyTorch takes one (``set_priority``)
_PRIORITY = ({'set_priority': True}
             if 'set_priority' in inspect.signature(sdpa_kernel).parameters else {})


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, impl: str,
           scaling: float, backends=SDPA_BACKENDS) -> torch.Tensor:
    """Masked multi-head attention with grouped KV heads, static shapes.

    The query heads that share a KV head are folded into the query length, so the keys are
    read once per KV head and any SDPA kernel that takes a mask serves grouped heads.

    :param q: (batch, num_heads, q_len, head_dim).
    :param k: (batch, num_kv_heads, k_len, head_dim); ``v`` likewise.
    :param mask: bool (batch, 1, q_len, k_len), True = attend; every row attends somewhere.
    :param impl: 'eager' (matmuls, fp32 softmax) or any other value for SDPA, except for
        CUDA steps of at most :data:`MATMUL_MAX_ROWS` query rows per KV head (decode), which
        take the matmuls too (on the CPU SDPA's kernel is the faster there).
    :param backends: the SDPA backends allowed, in order (default :data:`SDPA_BACKENDS`).
    :returns: (batch, q_len, num_heads, head_dim).
    """
    b, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    q = q.reshape(b, kv_heads, rep * q_len, head_dim)  # head g * rep + r -> row r * q_len + i
    if rep > 1 and q_len > 1:
        mask = mask[:, :, None].expand(b, 1, rep, q_len, mask.shape[-1]).reshape(
            b, 1, rep * q_len, mask.shape[-1])
    if impl == 'eager' or (q.is_cuda and rep * q_len <= MATMUL_MAX_ROWS):
        weights = torch.matmul(q, k.transpose(2, 3)) * scaling  # (b, kv_heads, rep * q, k)
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v)
    elif q.is_cuda:  # (the CPU has no cuDNN kernel to avoid: no context to enter there)
        with sdpa_kernel(backends, **_PRIORITY):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q_len, head_dim).transpose(1, 2)
