"""The spec cases of the attention backends' grid (`tests.helpers.inputs.Case` strings) that more than one test
module runs: tests/attention/test_backends.py (every backend vs the definition) and
tests/attention/test_integer_products.py (the CPU kernel's integer products vs their bound)."""

from __future__ import annotations

UNIFORM = [
    # every bit width for keys and values, groups 16-128, sinks, batch, GQA ratios 1-8
    "k4v4-plain-g64 h3x3 p3 e5",
    "k2v2-plain-g32 b2 h2x1 p5 e1",
    "k3v3-plain-g32-s4 h2x4 p2 e7",
    "k8v8-plain-g64 b2 h1x2 p2 e3",
    "k4v2-plain-g32-s2 h2x2 p4 e9 q3",
    "k2v4-plain-g64 h1x3 p1 e130",  # exact tokens over several tiles
    "k3v8-plain-g64-s1 b2 p3 e2 q2",
    "k8v3-plain-g32 h3x1 p1 e1",
    "k4v4-plain-g32 b2 h2x2 p0 e6",  # nothing packed yet
    "k4v4-plain-g32 h2x3 p40 e3",  # several chunks per head
    # value groups unlike the key group, several per row; rows in passes of 4; heads of 32, 128 and 256
    "k4v4-plain-gk64-gv32-s1 h2x4 p3 e5 d128 pad3",
    "k2v8-plain-gk32-gv64-s1 h1x8 p2 e3 d128 pad3",
    "k8v2-plain-gk64-gv16-s1 h1x5 p2 e4 q2 d256 pad3",
    "k4v2-plain-g16-s1 h2x3 p4 e3 d32 pad3",
    "k3v4-plain-gk32-gv128-s1 h1x2 p2 e2 d128 pad3",
]
ROTATED = [
    # packed data stored rotated (Hadamard where the head dim is a power of two, else a random orthogonal matrix):
    # keys, values or both; the exact sinks and residual are not
    "k4v4-plain-g32-s1-rot b2 h2x3 p3 e5 pad7",
    "k4v4-plain-g32-s1-rotk b2 h2x3 p3 e5 pad7",
    "k4v4-plain-g32-s1-rotv b2 h2x3 p3 e5 pad7",
    "k2v3-plain-g32-s1-rot b2 h2x2 p3 e5 q2 d96 pad7",
    "k2v3-plain-g32-s1-rotk b2 h2x2 p3 e5 q2 d96 pad7",
    "k2v3-plain-g32-s1-rotv b2 h2x2 p3 e5 q2 d96 pad7",
]
CODEBOOKS = [
    # the kernels read the level table (a permute lookup, or a tile through the table for 3 bits); clipped ranges
    # change only scales and zeros; with and without rotation; 8-bit keys stay uniform
    "k4v4-plain-gk32-gv64-s1-cb b2 h2x3 p3 e5 pad7",
    "k2v2-plain-g32-s1-cb-clip b2 h2x2 p4 e5 q2 pad7",
    "k3v3-plain-g32-s1-cb b2 h2x1 p2 e5 pad7",
    "k4v2-plain-g32-s1-rot-cbk-clip b2 h2x2 p3 e5 pad7",
    "k2v4-plain-g32-s1-cbv b2 h2x4 p2 e5 d128 pad7",
    "k8v3-plain-gk32-gv16-s1-cbv-clip b2 h2x1 p2 e5 q3 pad7",
    "k4v4-plain-gk32-gv64-s1-clip b2 h2x3 p3 e5 pad7",
]
