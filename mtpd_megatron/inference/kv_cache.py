"""Static KV caches plugged into megatron's attention modules through their `core_attention` slot.

Decoding reuses every megatron module unchanged (norms, QKV projection, QK-norm, RoPE, output projection,
MLP/MoE, the MTP layers' eh_proj and norms) and swaps only the innermost `core_attention` of each
SelfAttention for `CachedCoreAttention` while a decoder is running. Megatron hands that slot query, key and
value of the *new* positions after RoPE ([s, b, heads, dim]); the cache writes key and value at their
absolute positions and attends over the whole cache with a mask `key_pos <= query_pos`.

Why the whole preallocated cache and a mask, not a slice to the current length: every shape stays static, so
the step can be captured in a CUDA graph and needs no host sync to learn the length. Entries beyond a query's
position (rejected drafts, padding of a window) are masked, so rollback is only moving the length pointer
back; caches start zeroed so a masked stale entry is always finite (0 weight x finite value = 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of one attention layer: [b, kv_heads_local, max_len, head_dim] each."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, batch: int, groups: int, max_len: int, dim: int, *, dtype, device) -> "KVCache":
        shape = (batch, groups, max_len, dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


@dataclass
class AttendState:
    """What the next attention call needs: which cache, and where the new positions are.

    Set by the decoder before each layer call (one layer -> one cache; the MTP depth decides the cache even
    when megatron reuses one MTP layer for every depth). `positions` is [b, s] (absolute), `mask` the
    [b, 1, s, max_len] boolean "may attend" mask built once per forward.
    """

    kv: Optional[KVCache] = None
    positions: Optional[Tensor] = None
    rows: Optional[Tensor] = None  # [b, 1] sample index (arange), for `write_at_positions`; set with the buffers
    mask: Optional[Tensor] = None
    annotate: bool = False  # a record_function("attention") region per call, for the profiler (profile.py)
    # Attention of up to this many new positions written out as matmul + masked softmax + matmul instead of one
    # SDPA call: under torch.compile (DecodeOptions.compile) inductor fuses the mask and softmax, and the two
    # small GEMMs beat cuDNN's masked SDPA at decode widths (measured: 7.5 us per call for 1 query, 16.9 us
    # for 5 on an H200). 0 = always SDPA (eager decoding: one kernel instead of five).
    explicit_up_to: int = 0

    def set_positions(self, positions: Tensor, max_len: int) -> None:
        self.positions = positions
        keys = torch.arange(max_len, device=positions.device)
        self.mask = keys.view(1, 1, 1, max_len) <= positions.unsqueeze(1).unsqueeze(-1)


class CachedCoreAttention(torch.nn.Module):
    """Stands in for megatron's core attention: write k/v at absolute positions, attend over the cache.

    Keeps the replaced module's softmax scale. With no cache active it defers to the original module, so a
    model that still has it installed behaves as before.
    """

    def __init__(self, original: torch.nn.Module, state: AttendState):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a child: state_dict/params untouched
        self.state = state
        self.softmax_scale = getattr(original, "softmax_scale", None)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> Tensor:
        st = self.state
        if st.kv is None:
            return self.original(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                **kwargs,
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("cached decoding supports neither attention_bias nor packed sequences")
        with torch.profiler.record_function("attention") if st.annotate else contextlib.nullcontext():
            return self._attend(st, query, key, value)

    def _attend(self, st: AttendState, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        s, b, heads, dim = query.shape
        kv = st.kv
        groups = kv.k.shape[1]
        # [s, b, g, d] -> [b, s, g, d], written at the per-sample positions of the cache's position axis.
        write_at_positions(kv.k, st.rows, st.positions, key.transpose(0, 1), dim=2)
        write_at_positions(kv.v, st.rows, st.positions, value.transpose(0, 1), dim=2)
        if s <= st.explicit_up_to:
            context = _explicit_attention(query.permute(1, 2, 0, 3), kv.k, kv.v, st.mask, self.softmax_scale)
            return context.permute(2, 0, 1, 3).reshape(s, b, heads * dim)
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),
            kv.k,
            kv.v,
            attn_mask=st.mask,
            scale=self.softmax_scale,
            enable_gqa=heads != groups,
        )
        return context.permute(2, 0, 1, 3).reshape(s, b, heads * dim)


def write_at_positions(buf: Tensor, rows: Tensor, positions: Tensor, values: Tensor, *, dim: int = 1) -> None:
    """buf[i, ..., positions[i, j], ...] = values[i, j] along `dim` (rows = [b, 1] sample index; positions
    [b, s] distinct within a sample; values [b, s, *the dims of buf after dim 0 other than dim]).

    Written as an index_put_, not a scatter_: under torch.compile, inductor re-inplaces index_put on a buffer
    the graph mutates, while a functional scatter clones the whole buffer, scatters into the clone and copies
    it back (measured on the GPU profile: two full-cache copy kernels per layer and step;
    tests/test_inference.py checks the compiled code allocates no buffer of the cache's size)."""
    index = (rows,) + (slice(None),) * (dim - 1) + (positions,)
    buf[index] = values.to(buf.dtype)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: Optional[float]) -> Tensor:
    """softmax(q k^T * scale, masked) v for q [b, heads, s, d] and k, v [b, groups, T, d] (GQA: head h reads
    group h // (heads / groups), as SDPA's enable_gqa), the softmax in fp32 at least; -> [b, heads, s, d]."""
    b, heads, s, d = q.shape
    groups, T = k.shape[1], k.shape[2]
    rep = heads // groups
    scale = scale if scale is not None else d**-0.5
    scores = torch.matmul(q.reshape(b, groups, rep * s, d), k.transpose(2, 3))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    allowed = mask.unsqueeze(2).expand(b, 1, rep, s, T).reshape(b, 1, rep * s, T)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, heads, s, d)


def attention_modules(model) -> list:
    """Every SelfAttention of the decoder layers, then of each MTP layer's inner transformer layer."""
    mods = [layer.self_attention for layer in model.decoder.layers]
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        mods += [layer.mtp_model_layer.self_attention for layer in mtp.layers]
    return mods


@contextlib.contextmanager
def cached_attention(model, state: AttendState) -> Iterator[None]:
    """Swap every core_attention for a CachedCoreAttention sharing `state`; restore on exit."""
    swapped = []
    try:
        for attn in attention_modules(model):
            original = attn.core_attention
            if isinstance(original, CachedCoreAttention):
                raise RuntimeError("a decoder is already running on this model (nested generate call)")
            attn.core_attention = CachedCoreAttention(original, state)
            swapped.append((attn, original))
        yield
    finally:
        for attn, original in swapped:
            attn.core_attention = original
