"""Attention inputs built from real packed data, described by a string (`Case`), and the float64 definition every
backend is checked against: softmax(q·K·scaling + bias)·V over the dequantized cache."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kvpack.attention.inputs import AttentionInputs
from kvpack.config import CacheConfig, parse_spec
from kvpack.quant.tensor import PackedTensor
from tests.quant.tolerances import ATTENTION_REL_TOL, HALF_OUTPUT_EPS

_SIZES = {"b": "batch", "p": "blocks", "e": "exact", "q": "queries", "d": "dim", "pad": "pad", "split": "split"}
_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One attention call over packed data, written as a kvpack spec string and then its shapes:

        Case.parse("k4v2-plain-gk32-gv16-s2-rot b2 h2x3 p4 e9 q3 d128 pad7 f16 split1")

    The spec says how the packed tokens are stored (bits, key and value groups, layout, rotation, codebook, clip,
    outliers) and how many exact sinks precede them; `-plain` so that nothing is implied. Shapes, each optional
    (default in brackets): `b` batch [1]; `h<kv heads>x<query heads per kv head>` [2x1]; `p` packed blocks of the
    spec's `block_tokens` [2]; `e` exact tokens after the sinks [5, at least the queries]; `q` new tokens [1]; `d`
    head dim [64]; `pad` how many of sample 0's first tokens the padded mask hides [sinks + block + 3, at most all
    tokens but one]; `f16` / `bf16` the model dtype [float32]; `split` packed blocks per triton program [its
    default]. The string is the test id.
    """

    name: str
    config: CacheConfig = field(repr=False)
    batch: int = 1
    kv_heads: int = 2
    rep: int = 1
    blocks: int = 2
    exact: int = 5
    queries: int = 1
    dim: int = 64
    pad: int | None = None
    dtype: torch.dtype = torch.float32
    split: int | None = None

    @classmethod
    def parse(cls, text: str) -> Case:
        """The case `text` describes (see the class doc); raises ValueError on a shape it does not know."""
        spec, *shapes = text.split()
        sizes: dict[str, int | torch.dtype] = {}
        for token in shapes:
            heads = re.fullmatch(r"h(\d+)x(\d+)", token)
            size = re.fullmatch(r"([a-z]+)(\d+)", token)
            if token in _DTYPES:
                sizes["dtype"] = _DTYPES[token]
            elif heads is not None:
                sizes["kv_heads"], sizes["rep"] = int(heads.group(1)), int(heads.group(2))
            elif size is not None and size.group(1) in _SIZES:
                sizes[_SIZES[size.group(1)]] = int(size.group(2))
            else:
                raise ValueError(f"{text!r}: unknown shape {token!r}; see tests.helpers.inputs.Case")
        return cls(text, parse_spec(spec), **sizes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.name

    @property
    def outliers(self) -> bool:
        return bool(self.config.key.outliers or self.config.value.outliers)

    @property
    def scaling(self) -> float:
        return self.dim**-0.5

    def inputs(self, backend: str = "auto", seed: int = 0) -> AttentionInputs:
        """Random keys and values `[batch, kv_heads, tokens, dim]` in the case's dtype: `blocks` blocks packed as the
        spec says (the KIVI layout unless it says otherwise), between the spec's exact sinks and the exact tokens.

        Channel 3 is 8x the others, as keys' outlier channels are; where the spec keeps outlier entries, 2% of the
        entries are also 12x spikes, which is what the entries are kept for."""
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.kv_heads)

        def rand(tokens: int) -> torch.Tensor:
            x = torch.randn(*shape, tokens, self.dim, generator=gen)
            x[..., 3] *= 8
            if self.outliers:
                spikes = torch.rand(x.shape, generator=gen) < 0.02
                x = torch.where(spikes, 12 * torch.randn(x.shape, generator=gen), x)
            return x.to(self.dtype)

        packed = self.blocks * self.config.block_tokens
        keys = PackedTensor.quantize(rand(packed), self.config.key) if packed else None
        values = PackedTensor.quantize(rand(packed), self.config.value) if packed else None
        exact = self.config.sinks + max(self.exact, self.queries)
        return AttentionInputs(rand(exact), rand(exact), keys, values, self.config.sinks, backend=backend)

    def query(self, seed: int = 1) -> torch.Tensor:
        """A random query `[batch, kv_heads * rep, queries, dim]` in the case's dtype."""
        shape = (self.batch, self.kv_heads * self.rep, self.queries, self.dim)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.dtype)

    def mask(self, tokens: int) -> torch.Tensor:
        """The padded mask over `tokens` tokens: causal, with `pad` (see the class doc) of sample 0's tokens hidden."""
        pad = self.pad if self.pad is not None else self.config.sinks + self.config.block_tokens + 3
        return padding_mask(self.batch, self.queries, tokens, min(pad, tokens - 1))

    def tolerance(self, inputs: AttentionInputs) -> float:
        """The largest |error| allowed against the definition: `ATTENTION_REL_TOL` in float32, one rounding of the
        output in half precision (`HALF_OUTPUT_EPS`), relative to max |value| (outputs are convex combinations)."""
        scale = inputs.dense()[1].abs().max().item()
        if self.dtype == torch.float32:
            return ATTENTION_REL_TOL * scale
        return HALF_OUTPUT_EPS * torch.finfo(self.dtype).eps * scale


def padding_mask(batch: int, queries: int, tokens: int, pad: int) -> torch.Tensor:
    """transformers' boolean mask `[batch, 1, queries, tokens]`: causal, and the first `pad` tokens of sample 0
    masked."""
    past = tokens - queries
    mask = torch.arange(tokens)[None, :] <= past + torch.arange(queries)[:, None]
    mask = mask.expand(batch, 1, queries, tokens).clone()
    mask[0, :, :, :pad] = False
    return mask


def attention_definition(
    query: torch.Tensor, inputs: AttentionInputs, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q·K·scaling + bias)·V in float64 over the dequantized keys and values, `[batch, queries, heads, dim]`.

    mask: boolean (True attends) or additive `[batch, 1, queries, tokens]`, or None: causal among the new tokens.
    A row that attends to nothing is zero.
    """
    keys, values = inputs.dense(torch.float64)
    _, heads, queries, _ = query.shape
    tokens = keys.shape[2]
    if mask is None:
        allowed = torch.arange(tokens)[None, :] <= tokens - queries + torch.arange(queries)[:, None]
        bias = torch.zeros(queries, tokens, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None]
    elif mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))[:, 0]
    else:
        bias = mask[:, 0].double()
    rep = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = query.double() @ keys.transpose(-1, -2) * scaling + bias[:, None]
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ values).transpose(1, 2)


def assert_close_to_definition(out: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """`out` (any dtype) within `tolerance` of the definition's `expected`, everywhere."""
    error = (out.double() - expected).abs().max().item()
    assert error <= tolerance, f"max error {error:.3g} > {tolerance:.3g}"


def on(inputs: AttentionInputs, device: torch.device, backend: str) -> AttentionInputs:
    """`inputs` on `device`, to be read by `backend`."""

    def move(packed: PackedTensor | None) -> PackedTensor | None:
        return None if packed is None else packed.map_parts(lambda t: t.to(device))

    return AttentionInputs(
        inputs.exact_keys.to(device), inputs.exact_values.to(device), move(inputs.packed_keys),
        move(inputs.packed_values), inputs.sink_len, backend=backend,
    )  # fmt: skip
