"""Attention computed on the packed cache: one entry point (`attend`), backends behind it (torch, cpu)."""

from kvpack.attention.inputs import AttentionInputs
from kvpack.attention.reference import reference_attention
from kvpack.attention.registry import BACKENDS, attend, kvpack_attention, register, use_kvpack_attention

__all__ = [
    "BACKENDS",
    "AttentionInputs",
    "attend",
    "kvpack_attention",
    "reference_attention",
    "register",
    "use_kvpack_attention",
]
