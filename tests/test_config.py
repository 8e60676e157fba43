"""Tests of `kvpack.config`: validation, spec strings, the JSON form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvpack.config import (
    PRESETS,
    SCHEMA_VERSION,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    CacheConfig,
    QuantSpec,
    as_config,
    parse_spec,
)
from kvpack.errors import ConfigError, KVPackError

# ---------------------------------------------------------------------------------------------------------
# Validation.


def test_config_error_is_a_kvpack_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, KVPackError)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        QuantSpec(bits=5)


def test_defaults() -> None:
    config = CacheConfig()
    assert config.key == QuantSpec(bits=4, group_size=64, axis="channel")
    assert config.value == QuantSpec(bits=4, group_size=64, axis="token")
    assert (config.residual, config.sinks) == (128, 0)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_quant_spec_accepts_supported_values(bits: int, group_size: int, axis: Any) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, axis=axis)
    # fp16 scale + fp16 zero = 32 bits per group.
    assert spec.bits_per_value == bits + 32 / group_size


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, -4, "4", None])
def test_quant_spec_bad_bits(bits: Any) -> None:
    with pytest.raises(ConfigError, match=r"bits=.* is not supported; use one of \(2, 3, 4, 8\)"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, 8, 48, 96, 256, -64, "64"])
def test_quant_spec_bad_group_size(group_size: Any) -> None:
    with pytest.raises(ConfigError, match=r"group_size=.* is not supported; use one of \(16, 32, 64, 128\)"):
        QuantSpec(group_size=group_size)


@pytest.mark.parametrize("axis", ["tokens", "head", "", "Token", None])
def test_quant_spec_bad_axis(axis: Any) -> None:
    with pytest.raises(ConfigError, match="use 'channel' or 'token'"):
        QuantSpec(axis=axis)


@pytest.mark.parametrize("field", ["bits", "group_size"])
def test_quant_spec_rejects_float_that_equals_a_supported_int(field: str) -> None:
    with pytest.raises(ConfigError):
        QuantSpec(**{field: 4.0 if field == "bits" else 64.0})


@pytest.mark.parametrize("name", ["residual", "sinks"])
@pytest.mark.parametrize("bad", [-1, -128, 1.5, 128.0, "128", None, True])
def test_cache_config_bad_residual_or_sinks(name: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"{name}=.* must be a non-negative integer"):
        CacheConfig(**{name: bad})


def test_cache_config_zero_residual_and_sinks_are_allowed() -> None:
    config = CacheConfig(residual=0, sinks=0)
    assert (config.residual, config.sinks) == (0, 0)


@pytest.mark.parametrize("field", ["key", "value"])
@pytest.mark.parametrize("bad", ["k4", {"bits": 4}, None, 4])
def test_cache_config_key_value_must_be_quant_specs(field: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match="QuantSpec"):
        CacheConfig(**{field: bad})


def test_configs_are_frozen_and_hashable() -> None:
    config = CacheConfig()
    with pytest.raises(AttributeError):
        config.residual = 3  # type: ignore[misc]
    assert hash(config) == hash(CacheConfig())


# ---------------------------------------------------------------------------------------------------------
# block_tokens.


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (QuantSpec(group_size=64, axis="channel"), QuantSpec(group_size=32, axis="token"), 64),
        (QuantSpec(group_size=32, axis="channel"), QuantSpec(group_size=128, axis="token"), 32),
        (QuantSpec(group_size=32, axis="channel"), QuantSpec(group_size=128, axis="channel"), 128),
        (QuantSpec(group_size=128, axis="channel"), QuantSpec(group_size=16, axis="channel"), 128),
        (QuantSpec(group_size=64, axis="token"), QuantSpec(group_size=16, axis="channel"), 16),
        (QuantSpec(group_size=64, axis="token"), QuantSpec(group_size=128, axis="token"), 1),
    ],
)
def test_block_tokens(key: QuantSpec, value: QuantSpec, expected: int) -> None:
    config = CacheConfig(key=key, value=value)
    assert config.block_tokens == expected
    # A block is whole groups of every spec that groups along tokens.
    for spec in (key, value):
        if spec.axis == "channel":
            assert config.block_tokens % spec.group_size == 0


# ---------------------------------------------------------------------------------------------------------
# Spec strings.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k4v2-plain", CacheConfig(value=QuantSpec(bits=2, group_size=64, axis="token"))),
        (
            "k8v8-g64-r128",
            CacheConfig(key=QuantSpec(8, 64, "channel"), value=QuantSpec(8, 64, "token"), residual=128),
        ),
        (
            "k4v4-plain-g32-r64-s4",
            CacheConfig(key=QuantSpec(4, 32, "channel"), value=QuantSpec(4, 32, "token"), residual=64, sinks=4),
        ),
        ("k4v4-gk32-gv64-plain", CacheConfig(key=QuantSpec(4, 32, "channel"), value=QuantSpec(4, 64, "token"))),
        ("k2v2-plain-kt-vc", CacheConfig(key=QuantSpec(2, 64, "token"), value=QuantSpec(2, 64, "channel"))),
        ("k3v8-plain-gv16", CacheConfig(key=QuantSpec(3, 64, "channel"), value=QuantSpec(8, 16, "token"))),
        ("k4v4-plain-r0", CacheConfig(residual=0)),
        ("k8v2-plain-s16-r256-g128", CacheConfig(QuantSpec(8, 128, "channel"), QuantSpec(2, 128, "token"), 256, 16)),
        ("  K4V2-PLAIN-G16  ", CacheConfig(QuantSpec(4, 16, "channel"), QuantSpec(2, 16, "token"))),
    ],
)
def test_parse_spec(text: str, expected: CacheConfig) -> None:
    assert parse_spec(text) == expected


def _recommended(key: QuantSpec, value: QuantSpec, sinks: int = 4, **fields: Any) -> CacheConfig:
    return CacheConfig(key=key, value=value, sinks=sinks, **fields)


ROT = "hadamard"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # 2-4 bits: values rotated (keys not) and 4 sinks; 2-bit keys: and clipped ranges; 8 bits: nothing.
        ("k4v4", _recommended(QuantSpec(4, 64, "channel"), QuantSpec(4, 64, "token", ROT))),
        ("k4v2", _recommended(QuantSpec(4, 64, "channel"), QuantSpec(2, 64, "token", ROT))),
        ("k3v3", _recommended(QuantSpec(3, 64, "channel"), QuantSpec(3, 64, "token", ROT))),
        ("k3v2", _recommended(QuantSpec(3, 64, "channel"), QuantSpec(2, 64, "token", ROT))),
        ("k2v4", _recommended(QuantSpec(2, 64, "channel", clip=True), QuantSpec(4, 64, "token", ROT))),
        ("k2v2", _recommended(QuantSpec(2, 64, "channel", clip=True), QuantSpec(2, 64, "token", ROT))),
        ("k8v8", CacheConfig(QuantSpec(8, 64, "channel"), QuantSpec(8, 64, "token"))),
        ("k8v2", _recommended(QuantSpec(8, 64, "channel"), QuantSpec(2, 64, "token", ROT))),
        # Written options add to the start (-rotk rotates the keys too); -s replaces its sinks.
        ("k4v4-rotk", _recommended(QuantSpec(4, 64, "channel", ROT), QuantSpec(4, 64, "token", ROT))),
        ("k4v4-s0", _recommended(QuantSpec(4, 64, "channel"), QuantSpec(4, 64, "token", ROT), sinks=0)),
        (
            "k4v4-s16-r64",
            _recommended(QuantSpec(4, 64, "channel"), QuantSpec(4, 64, "token", ROT), 16, residual=64),
        ),
        (
            "k2v2-cbv",
            _recommended(QuantSpec(2, 64, "channel", clip=True), QuantSpec(2, 64, "token", ROT, "lloyd1")),
        ),
        # -plain starts from nothing, anywhere in the spec.
        ("k4v4-plain-rotk", CacheConfig(QuantSpec(4, 64, "channel", ROT), QuantSpec(4, 64, "token"))),
        ("k2v2-s4-plain", CacheConfig(QuantSpec(2, 64, "channel"), QuantSpec(2, 64, "token"), sinks=4)),
    ],
)
def test_specs_start_from_the_recommended_options_unless_plain(text: str, expected: CacheConfig) -> None:
    assert parse_spec(text) == expected


def test_presets_are_the_plain_spec_strings_of_their_bits() -> None:
    assert as_config("balanced") == parse_spec("k4v4")
    assert as_config("compact") == parse_spec("k4v2")
    assert as_config("max-compression") == parse_spec("k2v2")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("k4v2", "k4v2-g64-r128-s4-rotv"),
        ("k4v2-plain", "k4v2-plain-g64-r128"),
        ("k2v2", "k2v2-g64-r128-s4-rotv-clipk"),
        ("k8v8-g64-r128", "k8v8-g64-r128"),  # recommended and plain agree at 8 bits: no -plain
        ("k4v4-g32-r64-s4-plain", "k4v4-plain-g32-r64-s4"),
        ("k4v4-gk32-gv64", "k4v4-gk32-gv64-r128-s4-rotv"),
        ("k4v4-gk32-gv32", "k4v4-g32-r128-s4-rotv"),  # equal group sizes collapse to -g
        ("k2v2-plain-kt-vc", "k2v2-plain-g64-r128-kt-vc"),
        ("k4v4-s0", "k4v4-plain-g64-r128-rotv"),  # fewer sinks than recommended: written from plain
        ("k4v4-plain-s0", "k4v4-plain-g64-r128"),  # no sinks is the plain default and is left out
        ("k4v4-plain-vc-kt-s2-r8-g16", "k4v4-plain-g16-r8-s2-kt-vc"),
        ("k2v2-plain-rot-s4", "k2v2-plain-g64-r128-s4-rot"),
        ("k2v2-plain-rotk", "k2v2-plain-g64-r128-rotk"),
        ("k4v4-rotv-g32", "k4v4-g32-r128-s4-rotv"),
        ("k4v4-rotk", "k4v4-g64-r128-s4-rot"),
        ("k4v4-plain-rotv-g32", "k4v4-plain-g32-r128-rotv"),
        ("k4v4-clip", "k4v4-g64-r128-s4-rotv-clip"),
    ],
)
def test_canonical_spec(text: str, canonical: str) -> None:
    config = parse_spec(text)
    assert config.spec == canonical
    assert parse_spec(canonical) == config


def all_configs() -> list[CacheConfig]:
    configs = []
    for kb in SUPPORTED_BITS:
        for vb in SUPPORTED_BITS:
            for kg in SUPPORTED_GROUP_SIZES:
                for vg in (kg, 16):
                    for k_axis, v_axis in (("channel", "token"), ("token", "channel"), ("channel", "channel")):
                        for residual, sinks, k_rot, v_rot in ((128, 0, "none", "hadamard"), (0, 4, "hadamard", "none")):
                            configs.append(
                                CacheConfig(
                                    key=QuantSpec(kb, kg, k_axis, k_rot),  # type: ignore[arg-type]
                                    value=QuantSpec(vb, vg, v_axis, v_rot),  # type: ignore[arg-type]
                                    residual=residual,
                                    sinks=sinks,
                                )
                            )
    return configs


def test_spec_round_trip_for_every_config() -> None:
    for config in all_configs():
        assert parse_spec(config.spec) == config, config.spec


def test_as_config() -> None:
    config = CacheConfig(residual=7)
    assert as_config(config) is config
    assert as_config("k4v4-plain-r7") == config
    with pytest.raises(ConfigError, match="spec string like 'k4v4'"):
        as_config(4)  # type: ignore[arg-type]


GRAMMAR = r"expected k<bits>v<bits>.*e\.g\. 'k4v2'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty cache spec; " + GRAMMAR),
        ("   ", "empty cache spec; " + GRAMMAR),
        ("x4v4", "cannot parse cache spec 'x4v4'; " + GRAMMAR),
        ("k4", "cannot parse cache spec 'k4'; " + GRAMMAR),
        ("kv4", "cannot parse cache spec 'kv4'; " + GRAMMAR),
        ("4v4", "cannot parse cache spec '4v4'; " + GRAMMAR),
        ("k4v4-q3", "unknown option 'q3' in cache spec 'k4v4-q3'; " + GRAMMAR),
        ("k4v4-", "unknown option '' in cache spec"),
        ("k4v4-r-1", "unknown option 'r' in cache spec"),
        ("k4v4-g", "unknown option 'g' in cache spec"),
        ("k4v4-gx32", "unknown option 'gx32' in cache spec"),
        ("k4v4_g32", "cannot parse cache spec"),
        ("k5v4", r"bits=5 is not supported; use one of \(2, 3, 4, 8\)"),
        ("k4v16", r"bits=16 is not supported"),
        ("k4v4-g48", r"group_size=48 is not supported; use one of \(16, 32, 64, 128\)"),
        ("k4v4-gk256", r"group_size=256 is not supported"),
        ("k4v4-gv8", r"group_size=8 is not supported"),
        ("k4v4-rotq", "unknown option 'rotq'"),
    ],
)
def test_parse_spec_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


@pytest.mark.parametrize("bad", [None, 4, b"k4v4", ["k4v4"]])
def test_parse_spec_non_string(bad: Any) -> None:
    with pytest.raises(ConfigError, match=GRAMMAR):
        parse_spec(bad)


# ---------------------------------------------------------------------------------------------------------
# JSON form.


def test_to_dict_layout() -> None:
    config = parse_spec("k8v2-plain-gk32-gv128-r64-s4-vc")
    assert config.to_dict() == {
        "schema_version": SCHEMA_VERSION,
        "key": {
            "bits": 8,
            "group_size": 32,
            "axis": "channel",
            "rotation": "none",
            "codebook": "uniform",
            "clip": False,
            "outliers": 0,
        },
        "value": {
            "bits": 2,
            "group_size": 128,
            "axis": "channel",
            "rotation": "none",
            "codebook": "uniform",
            "clip": False,
            "outliers": 0,
        },
        "residual": 64,
        "sinks": 4,
    }


def test_dict_round_trip_through_json() -> None:
    for config in all_configs():
        data = json.loads(json.dumps(config.to_dict()))
        assert CacheConfig.from_dict(data) == config


def test_from_dict_does_not_mutate_its_argument() -> None:
    data = CacheConfig().to_dict()
    snapshot = json.loads(json.dumps(data))
    CacheConfig.from_dict(data)
    assert data == snapshot


@pytest.mark.parametrize("version", [None, 0, 2, "1", "v1"])
def test_from_dict_wrong_schema_version(version: Any) -> None:
    data = CacheConfig().to_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    with pytest.raises(ConfigError, match=f"schema_version {version!r} is not supported.*reads version 1"):
        CacheConfig.from_dict(data)


def _with(change: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    data = CacheConfig().to_dict()
    data.update(change)
    for name in drop:
        del data[name]
    return data


@pytest.mark.parametrize(
    "data",
    [
        _with({}, drop=("key",)),
        _with({}, drop=("value",)),
        _with({"key": None}),
        _with({"value": "k4"}),
        _with({"key": [4, 64, "channel"]}),
        _with({"extra": 1}),
        _with({"key": {"bits": 4, "group_size": 64, "axis": "channel", "scale_dtype": "fp16"}}),
        _with({"key": {"bits": 5, "group_size": 64, "axis": "channel"}}),
        _with({"value": {"bits": 4, "group_size": 48, "axis": "token"}}),
        _with({"value": {"bits": 4, "group_size": 64, "axis": "tokens"}}),
        _with({"residual": -1}),
        _with({"residual": "128"}),
        _with({"sinks": 1.5}),
    ],
)
def test_from_dict_malformed_fields(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CacheConfig.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "k4v4", 4])
def test_from_dict_not_an_object(data: Any) -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        CacheConfig.from_dict(data)


@pytest.mark.parametrize(
    ("name", "bits"), [("balanced", 4.5), ("compact", 3.5), ("max-compression", 2.5), (" Balanced ", 4.5)]
)
def test_presets_resolve_to_their_spec_and_size_class(name: str, bits: float) -> None:
    config = as_config(name)
    assert config == parse_spec(PRESETS[name.strip().lower()])
    assert config.bits_per_value == bits
    assert parse_spec(config.spec) == config  # a preset's table label is its full, canonical spec


def test_every_preset_has_sinks_and_rotated_values_but_plain_keys() -> None:
    """Keys are not rotated by default: it costs some families far more than it gains on others (config.py)."""
    for spec in PRESETS.values():
        config = parse_spec(spec)
        assert config.sinks > 0
        assert config.key.rotation == "none" and config.value.rotation != "none"


def test_unknown_name_is_not_taken_for_a_preset() -> None:
    with pytest.raises(ConfigError, match="cannot parse cache spec"):
        as_config("balance")
