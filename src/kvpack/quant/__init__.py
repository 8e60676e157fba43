"""Pure-torch reference of kvpack's numerics: affine group quantization, bit packing, PackedTensor."""

from kvpack.quant.packing import pack, packed_row_bytes, unpack
from kvpack.quant.tensor import PackedTensor

__all__ = ["PackedTensor", "pack", "packed_row_bytes", "unpack"]
