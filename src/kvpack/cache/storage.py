"""`PackedBuffer`: the growable, preallocated packed storage of one layer's keys or values."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kvpack.config import QuantSpec
from kvpack.errors import ShapeError
from kvpack.quant.packing import packed_row_bytes
from kvpack.quant.tensor import PackedTensor

# Capacity grows by at least this many tokens (or by an eighth of the current capacity, if larger), so a
# decode step appends in place and the whole buffer is copied only once every such chunk.
GROWTH_TOKENS = 256


class PackedBuffer:
    """Packed tokens of one tensor `[batch, heads, tokens, head_dim]`, appended in whole groups.

    Storage is laid out as in `PackedTensor` with the token (or token-block) dimension at index 2 and a
    capacity beyond the valid length, so appending writes in place. Data once written is never
    re-quantized; `view()` returns the valid part as a `PackedTensor` without copying.
    """

    def __init__(self, spec: QuantSpec, batch: int, heads: int, head_dim: int, device: torch.device):
        self.spec = spec
        self.head_dim = head_dim
        self.length = 0  # valid tokens
        # One storage unit along dim 2: a token (per-token groups) or a block of group_size tokens.
        self.unit_tokens = spec.group_size if spec.axis == "channel" else 1
        if spec.axis == "channel":
            row_shape: tuple[int, ...] = (head_dim, packed_row_bytes(spec.group_size, spec.bits))
            param_shape: tuple[int, ...] = (head_dim,)
        else:
            row_shape = (packed_row_bytes(head_dim, spec.bits),)
            param_shape = (head_dim // spec.group_size,)
        self.codes = torch.empty((batch, heads, 0, *row_shape), dtype=torch.uint8, device=device)
        self.scale = torch.empty((batch, heads, 0, *param_shape), dtype=torch.float16, device=device)
        self.zero = torch.empty_like(self.scale)
        # With outliers: their values and positions, shaped like scale with a trailing `spec.outliers` dimension.
        self.outlier_values: torch.Tensor | None = None
        self.outlier_positions: torch.Tensor | None = None
        if spec.outliers:
            self.outlier_values = self.scale.new_empty((*self.scale.shape, spec.outliers))
            self.outlier_positions = self.outlier_values.to(torch.uint8)
        self._view: PackedTensor | None = None
        self._view_key: tuple[int, ...] = ()

    @property
    def capacity_units(self) -> int:
        return self.codes.shape[2]

    @property
    def length_units(self) -> int:
        return self.length // self.unit_tokens

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """codes, scale, zero, then the outliers' values and positions when the spec keeps outliers."""
        if self.outlier_values is None or self.outlier_positions is None:
            return self.codes, self.scale, self.zero
        return self.codes, self.scale, self.zero, self.outlier_values, self.outlier_positions

    def _set_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace the storage tensors, in the order of `_tensors`."""
        self.codes, self.scale, self.zero, *outliers = tensors
        if outliers:
            self.outlier_values, self.outlier_positions = outliers

    def _reserve(self, units: int) -> None:
        if units <= self.capacity_units:
            return
        growth = max(GROWTH_TOKENS // self.unit_tokens, self.capacity_units // 8, 1)
        new_capacity = max(units, self.capacity_units + growth)
        grown = []
        for t in self._tensors():
            fresh = t.new_empty((t.shape[0], t.shape[1], new_capacity, *t.shape[3:]))
            fresh[:, :, : self.length_units] = t[:, :, : self.length_units]
            grown.append(fresh)
        self._set_tensors(grown)

    def append(self, packed: PackedTensor) -> None:
        """Append already-quantized tokens (`PackedTensor.quantize` of `[batch, heads, n, head_dim]`)."""
        start = self.length_units
        end = start + packed.codes.shape[2]
        parts = tuple(packed.parts().values())  # the order of `_tensors` (PackedTensor.parts documents it)
        if len(parts) != len(self._tensors()):
            raise ShapeError(
                f"cannot append packed data with outliers={packed.spec.outliers} to a buffer of spec {self.spec}."
            )
        if self.capacity_units == 0:
            # First fill (typically the prefill): allocate exactly, growth comes later.
            self._set_tensors(t.contiguous() for t in parts)
        else:
            self._reserve(end)
            for stored, new in zip(self._tensors(), parts, strict=True):
                stored[:, :, start:end] = new
        self.length += packed.shape[2]

    def view(self) -> PackedTensor:
        """The valid tokens as a `PackedTensor` (views into the storage, no copy).

        Decode asks for it at every step of every layer while it changes once per packed block: the last view is
        reused as long as the length and the storage tensors are the same.
        """
        key = (self.length, *map(id, self._tensors()))
        if self._view_key != key or self._view is None:
            n = self.length_units
            batch, heads = self.codes.shape[:2]
            values, positions = self.outlier_values, self.outlier_positions
            self._view = PackedTensor(
                codes=self.codes[:, :, :n],
                scale=self.scale[:, :, :n],
                zero=self.zero[:, :, :n],
                shape=torch.Size((batch, heads, self.length, self.head_dim)),
                spec=self.spec,
                outlier_values=None if values is None else values[:, :, :n],
                outlier_positions=None if positions is None else positions[:, :, :n],
            )
            self._view_key = key
        return self._view

    def drop_oldest(self, tokens: int) -> None:
        """Forget the oldest `tokens` (a multiple of the storage unit) and release their storage.

        Sliding-window layers call this at most once per packed block, on a window's worth of data, so
        reallocating to exactly what is kept costs little and keeps `nbytes()` to the window.
        """
        units = tokens // self.unit_tokens
        if units <= 0:
            return
        keep = self.length_units - units
        self._set_tensors([t[:, :, units : units + keep].clone() for t in self._tensors()])
        self.length -= units * self.unit_tokens

    def drop_newest(self, tokens: int) -> None:
        """Forget the newest `tokens` (a multiple of the storage unit); their storage becomes free capacity."""
        self.length -= tokens // self.unit_tokens * self.unit_tokens

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (index_select, repeat_interleave...) to every tensor."""
        self._set_tensors([fn(t) for t in self._tensors()])

    def nbytes(self) -> int:
        """Exact bytes held, unused capacity included."""
        return sum(t.numel() * t.element_size() for t in self._tensors())
