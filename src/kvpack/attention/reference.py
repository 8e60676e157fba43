"""The pure-torch reference of attention over a packed cache (`AttentionInputs`), which every backend must match."""

from __future__ import annotations

import torch

from kvpack.attention.inputs import AttentionInputs

# Running maxima start here rather than at -inf, so a fully masked row gives 0 / 0 -> 0, not NaN (see `combine`).
NEG_LARGE = -1.0e30


def attention_bias(mask: torch.Tensor | None, batch: int, queries: int, tokens: int) -> torch.Tensor | None:
    """An additive float32 bias `[batch, queries, tokens]` (0 or -inf) from transformers' mask, or None.

    mask: None (no padding: causal among the new tokens), or a boolean (True = attend) / additive float mask
    `[batch, 1, queries, tokens]` whose last `tokens` columns are the layer's tokens in position order.
    """
    if mask is None:
        if queries == 1:
            return None
        # New query i sees every past token and the new tokens up to itself.
        past = tokens - queries
        allowed = torch.arange(tokens)[None, :] <= past + torch.arange(queries)[:, None]
        bias = torch.zeros(queries, tokens).masked_fill_(~allowed, float("-inf"))
        return bias.expand(batch, queries, tokens)
    mask = mask[:, 0, :, -tokens:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def reference_attention(
    query: torch.Tensor,
    inputs: AttentionInputs,
    mask: torch.Tensor | None,
    scaling: float,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """`softmax(q·K·scaling + bias)·V` in float32, dequantizing `chunk_tokens` packed tokens at a time.

    The definition every backend matches (the `torch` backend): never holds more than one chunk dequantized;
    chunks are merged with their log-sum-exp (online softmax).
    query: `[batch, heads, queries, head_dim]`, heads a multiple of the kv heads (grouped-query attention).
    Returns `[batch, queries, heads, value_dim]` in the query's dtype (the layout transformers expects).
    A query row that may attend to nothing gives zeros.
    """
    batch, heads, queries, _ = query.shape
    kv_heads = inputs.exact_keys.shape[1]
    # Grouped-query heads become rows of their kv head: [batch, kv_heads, rep * queries, head_dim].
    q = query.float().reshape(batch, kv_heads, -1, query.shape[-1]) * scaling
    bias = attention_bias(mask, batch, queries, inputs.total_tokens)
    if bias is not None:
        bias = bias.to(q.device).repeat(1, heads // kv_heads, 1)[:, None]  # rows ordered as in q
    s, packed = inputs.sink_len, inputs.packed_tokens
    segments = [(inputs.exact_keys[:, :, :s], inputs.exact_values[:, :, :s], 0)]
    if inputs.packed_keys is not None and inputs.packed_values is not None:
        step = max(chunk_tokens // inputs.packed_keys.spec.group_size, 1) * inputs.packed_keys.spec.group_size
        for start in range(0, packed, step):
            end = min(start + step, packed)
            keys = inputs.packed_keys.slice_tokens(start, end).dequantize()
            values = inputs.packed_values.slice_tokens(start, end).dequantize()
            segments.append((keys, values, s + start))
    segments.append((inputs.exact_keys[:, :, s:], inputs.exact_values[:, :, s:], s + packed))
    top = torch.full((*q.shape[:-1], 1), NEG_LARGE, device=q.device)
    total = torch.zeros_like(top)
    out = torch.zeros((*q.shape[:-1], inputs.exact_values.shape[-1]), device=q.device)
    for keys, values, first in segments:
        if keys.shape[2] == 0:
            continue
        scores = q @ keys.float().transpose(-1, -2)
        if bias is not None:
            scores = scores + bias[..., first : first + keys.shape[2]]
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        weights = torch.exp(scores - new_top)
        correction = torch.exp(top - new_top)
        total = total * correction + weights.sum(dim=-1, keepdim=True)
        out = out * correction + weights @ values.float()
        top = new_top
    out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out.reshape(batch, heads, queries, -1).transpose(1, 2).to(query.dtype)
