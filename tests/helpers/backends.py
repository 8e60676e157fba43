"""The attention backends, and which of them this machine runs: the one list every test parametrised by backend uses.

A backend this machine cannot run stays in the parametrisation, skipped with the reason (`pytest -ra` lists them),
rather than silently left out.
"""

from __future__ import annotations

import importlib.util

import pytest

from kvpack.attention import BACKENDS

# Every backend kvpack registers, `auto` aside: the backend grid runs each (tests/attention/test_backends.py).
KERNELS = tuple(name for name in BACKENDS if name != "auto")
# The backends that read CPU tensors: what the tiny-model generation tests run (triton only interprets CPU tensors,
# far too slowly for a model; tests/attention/test_triton.py runs it in one model).
CPU_KERNELS = ("torch", "cpu", "numba")


def why_unavailable(backend: str) -> str | None:
    """None when `backend` runs here, else why not (`dense` and `auto` always run)."""
    if backend in ("torch", "auto", "dense"):
        return None
    if backend == "cpu":
        from kvpack.attention import cpu

        return cpu.why_unavailable()
    if backend == "numba":
        return None if importlib.util.find_spec("numba") else "numba is not installed"
    if backend == "triton":
        from kvpack.attention import triton_gpu

        return triton_gpu.why_unavailable()
    raise ValueError(f"unknown attention backend {backend!r}: teach tests/helpers/backends.py how to find it")


def backend_params(*backends: str) -> list:
    """`backends` as pytest parameters, each one this machine cannot run marked skipped with the reason."""
    params = []
    for name in backends:
        why = why_unavailable(name)
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params
