"""Attention for batches with no padding at all (`sft_training.padding_free`): a step's whole conversations
concatenated into one row, their boundaries given as cumulative lengths (`cu_seq_lens_q/k`, `max_length_q/k`, made
by transformers' DataCollatorWithFlattening), so no token attends across conversations and no compute goes to padding.

    register()         make ATTENTION a name transformers' `attn_implementation` accepts
    kernel_note()      which kernel runs on this machine, in one line

On CUDA the attention runs through PyTorch's own variable-length flash kernel (`torch.nn.attention.varlen`,
torch >= 2.10); elsewhere (a CPU: tests, the demo) through SDPA once per conversation. Ours because transformers'
flash-attention path needs the flash-attn package, and its SDPA path turns the same batch into a dense block mask
over the whole row (quadratic in the batch's tokens). Registered without a mask function, so transformers builds
no mask for it; a call without boundaries (generation, batch of one row) is plain causal SDPA.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

ATTENTION = "hh_sft_varlen"


def register() -> str:
    """Register the attention under ATTENTION (idempotent) and return that name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    return ATTENTION


def kernel_note() -> str:
    if _flash_varlen() is not None:
        return "padding_free: one row per step, attention through torch's varlen flash kernel (CUDA)"
    return ("padding_free: one row per step, attention through SDPA once per conversation (no varlen kernel on this "
            "machine: it needs CUDA and torch >= 2.10)")


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query (batch, heads, tokens, dim), key/value (batch, kv_heads, tokens,
    dim); returns (batch, tokens, heads, dim) and no weights."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:
        if attention_mask is None and query.shape[0] > 1:
            raise ValueError(f"{ATTENTION} attention got a batch of {query.shape[0]} rows and no mask: it serves "
                             "one concatenated row per step (transformers' DataCollatorWithFlattening)")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dropout = dropout if module.training else 0.0
    flash = _flash_varlen() if query.is_cuda else None
    if flash is not None:
        return flash(query, key, value, boundaries, kwargs["max_length_q"], scaling), None
    starts = boundaries.tolist()
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                             is_causal=True, scale=scaling, enable_gqa=True)
              for a, b in zip(starts[:-1], starts[1:])]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _flash_varlen():
    """torch's varlen flash attention as f(query, key, value, cu_seq_lens, max_length, scale) -> (1, tokens, heads,
    dim), or None where it cannot run (no CUDA, torch < 2.10). Its keyword names moved between releases (2.10:
    `is_causal`; later: `window_size`, `enable_gqa`): read from its signature."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepted = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    gqa = "enable_gqa" in accepted

    def attend(query, key, value, cu_seq_lens, max_length, scale):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        extra = {"enable_gqa": True} if gqa else {}
        if "scale" in accepted:
            extra["scale"] = scale
        out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **causal, **extra)
        return out.unsqueeze(0)

    return attend
