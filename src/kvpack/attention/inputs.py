"""The contract between a packed cache and attention: what one layer's attention reads.

A layer's tokens, in position order: the exact sinks, the packed blocks, then the exact residual window and the
new tokens. Kernels take the exact tokens as one segment (`exact_keys`: sinks, then residual and new tokens) and
the packed tokens as `PackedTensor`s; position `e` of the exact segment is token `e` when `e < sink_len`, else
token `e + packed_tokens`. In fused mode `KVPackCache.update` returns a key tensor that carries the layer's
`AttentionInputs` as its attribute `INPUTS_ATTRIBUTE`, which `kvpack.attention.registry.kvpack_attention` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvpack.quant.tensor import PackedTensor

# The attribute of the key tensor that `KVPackCache.update` returns in fused mode.
INPUTS_ATTRIBUTE = "kvpack_inputs"


@dataclass
class AttentionInputs:
    """One layer's keys and values as attention reads them.

    exact_keys, exact_values: `[batch, kv_heads, exact_tokens, head_dim]`, model dtype: the sinks (the first
        `sink_len`), then the residual window and the new tokens.
    packed_keys, packed_values: the packed tokens between the sinks and the residual, or None when there are none.
    backend: the attention backend asked for (`auto`, `torch`, `cpu`, `numba`, `triton`).
    memo: where attention keeps what it resolved for this layer (backend, constants), so that it does so once per
        layer, not per step: the layer passes the same dict at every step and never reads it. None: resolve per call.
    """

    exact_keys: torch.Tensor
    exact_values: torch.Tensor
    packed_keys: PackedTensor | None
    packed_values: PackedTensor | None
    sink_len: int
    backend: str = "auto"
    memo: dict[Any, Any] | None = None

    @property
    def packed_tokens(self) -> int:
        return 0 if self.packed_keys is None else int(self.packed_keys.shape[2])

    @property
    def total_tokens(self) -> int:
        return self.packed_tokens + int(self.exact_keys.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes attention reads: the packed tokens' codes, scales and zeros, and the exact tokens."""
        packed = sum(t.nbytes for t in (self.packed_keys, self.packed_values) if t is not None)
        return packed + self.exact_keys.nbytes + self.exact_values.nbytes

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values in position order, dequantized: `[batch, kv_heads, total_tokens, head_dim]`."""
        s = self.sink_len
        keys = [self.exact_keys[:, :, :s].to(dtype)]
        values = [self.exact_values[:, :, :s].to(dtype)]
        if self.packed_keys is not None and self.packed_values is not None:
            keys.append(self.packed_keys.dequantize(dtype))
            values.append(self.packed_values.dequantize(dtype))
        keys.append(self.exact_keys[:, :, s:].to(dtype))
        values.append(self.exact_values[:, :, s:].to(dtype))
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)
