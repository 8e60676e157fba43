"""Frozen, validated configuration of a packed KV cache, and its compact spec strings.

A spec string is the short form used on the command line and in result tables:

    k4v2                  4-bit keys, 2-bit values, and the options recommended for those widths (below)
    k4v4-plain            plain KIVI: no rotation, no sinks, uniform codes over each group's min..max
    k8v8-g64-r128         groups of 64, a full-precision residual window of 128 tokens
    k4v4-g32-r64-s4       ... and 4 full-precision "sink" tokens at the start (-s0: none)
    k2v2-s4-rot           keys and values rotated (randomized Hadamard) before quantization; -rotk / -rotv: one
    k2v2-o1               1 outlier per group kept exactly (float16 + position) for keys and values; -ok1 / -ov1: one
    k2v2-rot-cb-clip      fitted non-uniform levels (codebook `lloyd1`) and MSE-optimal clipping of each group's range;
                          -cbk / -cbv and -clipk / -clipv: keys or values only
    k4v4-s4-rot-l4342...  per-layer bits: two digits per decoder layer, key then value bits (layer 0: 4-bit keys,
                          3-bit values; layer 1: 4 and 2; ...); they replace the head's bits in every layer

Unless a spec says `-plain`, it starts from the options that measured best for its bit widths on kvpack's
calibration text (`recommended_options`; `benchmarks/results/key_rotation.md`,
`benchmarks/results/history/selection_calibration.md`): values of 4 bits or fewer are rotated (keys are not: rotating
keys helps some families and costs others far more, so it is the option `-rotk`), 2-bit keys get clipped ranges, and
4 sink tokens are kept when any tensor has 4 bits or fewer. Options written in the spec add to that start (`-s<n>`
replaces the sinks); `-plain` starts from nothing, so `k4v4-plain-s4` is plain KIVI with 4 sinks. 8-bit specs start
plain: at 8 bits the options change nothing measurable.

A preset name (`balanced`, `compact`, `max-compression`: see `PRESETS`) is accepted wherever a spec string is
(`as_config`), and so is a calibrated profile (`kvpack calibrate`, a `.json` file; `kvpack.profile.resolve_config`).

`parse_spec(s)` and `CacheConfig.spec` are inverses (for canonical strings). The canonical string writes every
option out (`k4v4` prints as `k4v4-g64-r128-s4-rotv`, plain KIVI as `k4v4-plain-g64-r128`), so a result table says
what ran. The same fields build the Python API (`CacheConfig(...)`: its field defaults are plain KIVI k4v4; use
`as_config("balanced")` or a spec string for the recommended options), the CLI and the JSON form (`to_dict` /
`from_dict`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from kvpack.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)
SCHEMA_VERSION = 1

Axis = Literal["channel", "token"]
# The names of the rotations (`kvpack.quant.rotation`) and codebooks (`kvpack.quant.codebooks`) a spec may name;
# the numbers behind them live in `kvpack.quant`, which builds on this module.
Rotation = Literal["none", "hadamard"]
ROTATIONS: tuple[Rotation, ...] = ("none", "hadamard")
Codebook = Literal["uniform", "lloyd1"]
CODEBOOKS: tuple[Codebook, ...] = ("uniform", "lloyd1")
# What the spec option `-cb` means: the newest fitted codebook.
FITTED_CODEBOOK: Codebook = "lloyd1"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (keys or values) is quantized.

    bits: code width, one of 2, 3, 4, 8.
    group_size: number of consecutive elements that share one scale and zero point.
    axis: "channel" quantizes each channel separately over groups of `group_size` consecutive tokens
        (KIVI's choice for keys, whose outliers live in fixed channels); "token" quantizes each token over
        groups of `group_size` consecutive channels (KIVI's choice for values).
    rotation: "hadamard" stores `x @ R` with R a fixed orthogonal (randomized Hadamard) matrix of the head dim, and
        reads back `y @ R.T` (see `kvpack.quant.rotation`); "none" (default) stores x.
    codebook: the reconstruction levels of the codes, `level[c] * scale + zero`: "uniform" (default) is
        level[c] = c; "lloyd1" uses levels fitted offline per bit width and axis (see `kvpack.quant.codebooks`).
        Not for 8 bits (ConfigError).
    clip: when True, each group's range is shrunk where that lowers the group's squared reconstruction error
        (a small grid search, see `kvpack.quant.affine.quantize_groups`); False (default) uses its min and max.
    outliers: entries per group kept exactly (a float16 value and a uint8 position in the group), the ones that
        most widen the group's range (see `kvpack.quant.outliers`); the scale and zero cover the others only. 0
        (default) stores none. Must be smaller than `group_size`.
    """

    bits: int = 4
    group_size: int = 64
    axis: Axis = "token"
    rotation: Rotation = "none"
    codebook: Codebook = "uniform"
    clip: bool = False
    outliers: int = 0

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}.")
        if type(self.group_size) is not int or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"group_size={self.group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}.")
        if self.axis not in ("channel", "token"):
            raise ConfigError(f"axis={self.axis!r} is not supported; use 'channel' or 'token'.")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation={self.rotation!r} is not supported; use one of {ROTATIONS}.")
        if self.codebook not in CODEBOOKS:
            raise ConfigError(f"codebook={self.codebook!r} is not supported; use one of {CODEBOOKS}.")
        if self.codebook != "uniform" and self.bits == 8:
            raise ConfigError(
                f"codebook={self.codebook!r} is for 2, 3 and 4 bits; 8-bit codes are already finer than float16 "
                "keys/values need, so use codebook='uniform' there (in a spec: -cbk or -cbv for the other tensor)."
            )
        if not isinstance(self.clip, bool):
            raise ConfigError(f"clip={self.clip!r} must be True or False.")
        if type(self.outliers) is not int or not 0 <= self.outliers < self.group_size:
            raise ConfigError(
                f"outliers={self.outliers!r} is not supported with group_size={self.group_size}; use an integer from 0 "
                f"to {self.group_size - 1} (typically 0, 1, 2 or 4)."
            )

    @property
    def bits_per_value(self) -> float:
        """Stored bits per quantized element, fp16 scale and zero included, and each outlier's fp16 value and
        uint8 position."""
        return self.bits + (32 + 24 * self.outliers) / self.group_size


def _key_spec() -> QuantSpec:
    return QuantSpec(bits=4, group_size=64, axis="channel")


def _value_spec() -> QuantSpec:
    return QuantSpec(bits=4, group_size=64, axis="token")


@dataclass(frozen=True)
class CacheConfig:
    """Configuration of a `KVPackCache`.

    key, value: the quantization of keys (default: per channel) and values (default: per token).
    residual: the newest tokens kept exactly, in the model's dtype (default 128). The tail of the prompt is
        protected too: at any time the last `residual` tokens are never quantized.
    sinks: the first tokens of the sequence kept exactly (default 0). Not used by sliding-window layers,
        whose window moves past them.
    layer_bits: per-layer bit widths, one `(key_bits, value_bits)` per decoder layer of the model (every layer,
        including any without a cache), or empty (default): `key` and `value` in every layer. When set, layer `i`
        uses `for_layer(i)`: `key`/`value` with their bits replaced, everything else (group sizes, axes,
        rotation, residual, sinks) shared.
    """

    key: QuantSpec = field(default_factory=_key_spec)
    value: QuantSpec = field(default_factory=_value_spec)
    residual: int = 128
    sinks: int = 0
    layer_bits: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, QuantSpec) or not isinstance(self.value, QuantSpec):
            raise ConfigError("key and value must be QuantSpec instances.")
        for name in ("residual", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer.")
        if not isinstance(self.layer_bits, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(type(b) is int for b in pair) for pair in self.layer_bits
        ):
            raise ConfigError(
                f"layer_bits={self.layer_bits!r} must be a tuple of (key_bits, value_bits) integer pairs, "
                "one per layer."
            )
        for idx, pair in enumerate(self.layer_bits):
            if not set(pair) <= set(SUPPORTED_BITS):
                raise ConfigError(f"layer_bits[{idx}]={pair}: bits must be among {SUPPORTED_BITS}.")

    def for_layer(self, idx: int) -> CacheConfig:
        """The configuration layer `idx` uses: this one without per-layer bits, its bits those of layer `idx`.

        Raises ConfigError when `idx` is not a layer of `layer_bits` (when it is set).
        """
        if not self.layer_bits:
            return self
        if not 0 <= idx < len(self.layer_bits):
            raise ConfigError(f"layer {idx} is outside the {len(self.layer_bits)} layers of layer_bits.")
        key_bits, value_bits = self.layer_bits[idx]
        return replace(
            self, key=replace(self.key, bits=key_bits), value=replace(self.value, bits=value_bits), layer_bits=()
        )

    def average_bits(self, key_dim: int = 1, value_dim: int = 1) -> float:
        """Stored bits per quantized value, scales and zeros included (sinks and residual excluded), averaged over
        layers and over keys and values weighted by their element counts (`key_dim`, `value_dim`: head dims)."""
        layers = [self.for_layer(i) for i in range(len(self.layer_bits))] or [self]
        total = sum(c.key.bits_per_value * key_dim + c.value.bits_per_value * value_dim for c in layers)
        return total / (len(layers) * (key_dim + value_dim))

    @property
    def bits_per_value(self) -> float:
        """`average_bits()` for keys and values of equal head dims (every supported model so far)."""
        return self.average_bits()

    @cached_property  # read at every decode step; the config is frozen
    def block_tokens(self) -> int:
        """Tokens quantized together: whole groups of every spec that groups along tokens."""
        sizes = [s.group_size for s in (self.key, self.value) if s.axis == "channel"]
        block = 1
        for size in sizes:  # group sizes are powers of two, so the largest is their lcm
            block = max(block, size)
        return block

    @property
    def spec(self) -> str:
        """The canonical spec string of this configuration: every option written out, and `-plain` after the bits
        when the options recommended for these bits (`recommended_options`) are not all in use."""
        head = f"k{self.key.bits}v{self.value.bits}"
        parts = []
        if self.key.group_size == self.value.group_size:
            parts.append(f"g{self.key.group_size}")
        else:
            parts += [f"gk{self.key.group_size}", f"gv{self.value.group_size}"]
        parts.append(f"r{self.residual}")
        if self.sinks:
            parts.append(f"s{self.sinks}")
        if self.key.axis != "channel":
            parts.append("kt")
        if self.value.axis != "token":
            parts.append("vc")
        for option, (name, _, default) in _FLAG_OPTIONS.items():
            flags = (getattr(self.key, name) != default, getattr(self.value, name) != default)
            if any(flags):
                parts.append(option + {(True, True): "", (True, False): "k", (False, True): "v"}[flags])
        if self.key.outliers == self.value.outliers:
            parts += [f"o{self.key.outliers}"] if self.key.outliers else []
        else:
            parts += [f"o{name}{n}" for name, n in (("k", self.key.outliers), ("v", self.value.outliers)) if n]
        if self.layer_bits:
            parts.append("l" + "".join(f"{k}{v}" for k, v in self.layer_bits))
        written = "-".join([head, *parts])
        if parse_spec(written) == self:
            return written
        return "-".join([head, "plain", *parts])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the schema version. `layer_bits` only when set: a uniform config keeps the layout
        that kvpack versions without per-layer bits read."""
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        if not self.layer_bits:
            del data["layer_bits"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheConfig:
        """Inverse of `to_dict`; raises `ConfigError` on an unknown schema version or fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"a cache config must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("schema_version", None)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"cache config schema_version {version!r} is not supported by this kvpack "
                f"(it reads version {SCHEMA_VERSION}); re-create the config with this version."
            )
        try:
            key = QuantSpec(**data.pop("key"))
            value = QuantSpec(**data.pop("value"))
            layer_bits = tuple(tuple(pair) for pair in data.pop("layer_bits", ()))
            return cls(key=key, value=value, layer_bits=layer_bits, **data)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"malformed cache config {data!r}: {exc}") from exc


# What a spec string starts from unless it says `-plain`, chosen by mean KL against the exact cache on kvpack's
# calibration text, never the evaluation text; the measurements are in benchmarks/results/key_rotation.md and
# benchmarks/results/history/selection_calibration.md (regenerate: scripts/reproduce.sh key_rotation selection):
# - rotation of 2- to 4-bit values; keys are not rotated: rotating keys helps some families and costs others far
#   more, and a default must not lose to plain KIVI with sinks on any family tried, so it is an option (`-rotk`);
# - clipped key ranges at 2 bits only: an option is taken only for a clear gain (>= 10% lower KL) on the
#   calibration text, and at 3 and 4 bits clipping gave none (benchmarks/results/history/ablation.md, heldout_*.md);
# - sinks when any tensor has 4 bits or fewer (more than 4 measured no better).
RECOMMENDED_SINKS = 4
_ROTATED_VALUE_BITS = (2, 3, 4)
_CLIPPED_KEY_BITS = (2,)


def with_recommended_options(config: CacheConfig) -> CacheConfig:
    """`config` with the options recommended for its bit widths switched on (what a spec string without `-plain`
    starts from; see the module docstring): rotation of 2- to 4-bit values, clipped ranges for 2-bit keys,
    `RECOMMENDED_SINKS` sinks when any tensor has 4 bits or fewer. Options already on stay on; sinks already set
    are kept."""
    key, value = config.key, config.value
    if value.bits in _ROTATED_VALUE_BITS:
        value = replace(value, rotation="hadamard")
    if key.bits in _CLIPPED_KEY_BITS:
        key = replace(key, clip=True)
    sinks = config.sinks
    if not sinks and min(key.bits, value.bits) <= 4:
        sinks = RECOMMENDED_SINKS
    return replace(config, key=key, value=value, sinks=sinks)


_HEAD = re.compile(r"^k(\d+)v(\d+)$")
# Per-tensor switches of a spec: option -> (QuantSpec field, the value the option sets, the field's default).
_FLAG_OPTIONS: dict[str, tuple[str, Any, Any]] = {
    "rot": ("rotation", "hadamard", "none"),
    "cb": ("codebook", FITTED_CODEBOOK, "uniform"),
    "clip": ("clip", True, False),
}
_FLAG = re.compile(r"^(rot|cb|clip)(k|v)?$")
_OPTION = re.compile(r"^(gk|gv|g|r|s)(\d+)$")
_OUTLIERS = re.compile(r"^o(k|v)?(\d+)$")
_LAYER_BITS = re.compile(r"^l\d+$")


def parse_spec(spec: str) -> CacheConfig:
    """Parse a compact spec string (see the module docstring) into a `CacheConfig`.

    Raises ConfigError with the accepted grammar when the string does not parse.
    """
    grammar = (
        "expected k<bits>v<bits>[-plain][-g<group>|-gk<group>-gv<group>][-r<residual>][-s<sinks>][-kt][-vc]"
        "[-rot|-rotk|-rotv][-cb|-cbk|-cbv][-clip|-clipk|-clipv][-o<outliers>|-ok<outliers>-ov<outliers>]"
        "[-l<key bits><value bits> per layer], "
        "e.g. 'k4v2' or 'k8v8-g64-r128'"
    )
    if not isinstance(spec, str):
        raise ConfigError(f"a cache spec must be a string, got {type(spec).__name__}; {grammar}.")
    if not spec.strip():
        raise ConfigError(f"empty cache spec; {grammar}.")
    head, *options = spec.strip().lower().split("-")
    match = _HEAD.match(head)
    if match is None:
        raise ConfigError(f"cannot parse cache spec {spec!r}; {grammar}.")
    start = CacheConfig()
    start = replace(
        start, key=replace(start.key, bits=int(match.group(1))), value=replace(start.value, bits=int(match.group(2)))
    )
    if "plain" not in options:
        start = with_recommended_options(start)
    key, value, residual, sinks = start.key, start.value, start.residual, start.sinks
    pending_outliers: dict[str, int] = {}
    layer_bits: tuple[tuple[int, int], ...] = ()
    for option in options:
        if option == "plain":
            continue
        if option == "kt":
            key = replace(key, axis="token")
            continue
        if option == "vc":
            value = replace(value, axis="channel")
            continue
        flag = _FLAG.match(option)
        if flag is not None:  # -rot, -cb, -clip: both tensors; with a k or v suffix, keys or values only
            name, setting, _ = _FLAG_OPTIONS[flag.group(1)]
            if flag.group(2) != "v":
                key = replace(key, **{name: setting})
            if flag.group(2) != "k":
                value = replace(value, **{name: setting})
            continue
        if _LAYER_BITS.match(option):
            digits = [int(d) for d in option[1:]]
            if len(digits) % 2:
                raise ConfigError(
                    f"per-layer bits {option!r} in cache spec {spec!r}: need two digits per layer (key then value "
                    f"bits), got {len(digits)} digits."
                )
            layer_bits = tuple(zip(digits[::2], digits[1::2], strict=True))
            continue
        outliers = _OUTLIERS.match(option)
        if outliers is not None:  # before the group sizes: outliers are checked against the final group size
            pending_outliers[outliers.group(1) or "kv"] = int(outliers.group(2))
            continue
        opt = _OPTION.match(option)
        if opt is None:
            raise ConfigError(f"unknown option {option!r} in cache spec {spec!r}; {grammar}.")
        name, number = opt.group(1), int(opt.group(2))
        if name in ("g", "gk"):
            key = replace(key, group_size=number)
        if name in ("g", "gv"):
            value = replace(value, group_size=number)
        if name == "r":
            residual = number
        if name == "s":
            sinks = number
    for which, count in pending_outliers.items():
        if "k" in which:
            key = replace(key, outliers=count)
        if "v" in which:
            value = replace(value, outliers=count)
    return CacheConfig(key=key, value=value, residual=residual, sinks=sinks, layer_bits=layer_bits)


PRESETS: dict[str, str] = {
    "balanced": "k4v4-s4-rotv",
    "compact": "k4v2-s4-rotv",
    "max-compression": "k2v2-s4-rotv-clipk",
}
"""Named configurations, one per size class (~4.5, ~3.5 and ~2.5 stored bits per value): the plain spec string of
that width (`k4v4`, `k4v2`, `k2v2`), whose options were chosen on kvpack's calibration text across model families
(`benchmarks/select_on_calibration.py`, `benchmarks/key_rotation.py`), never on the evaluation text.
Model-agnostic: a profile calibrated for one model (`kvpack calibrate`), or key rotation (`-rotk`) where it measures
better for a model, can do better at the same bits. The README gives their measured quality."""

DEFAULT_PRESET = "balanced"


def as_config(config: object) -> CacheConfig:
    """Accept a `CacheConfig`, a preset name (`PRESETS`) or a spec string. (A calibrated profile's path is accepted
    one layer up, by `kvpack.profile.resolve_config`, which the CLI and `KVPackCache` use.)"""
    if isinstance(config, CacheConfig):
        return config
    if isinstance(config, str) and config.strip().lower() in PRESETS:
        return parse_spec(PRESETS[config.strip().lower()])
    if isinstance(config, str):
        return parse_spec(config)
    raise ConfigError(
        f"expected a CacheConfig, a preset ({', '.join(PRESETS)}) or a spec string like 'k4v4', got "
        f"{type(config).__name__} (a calibrated profile's path: `kvpack.profile.resolve_config`)."
    )
