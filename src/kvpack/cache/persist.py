"""Prompt caches on disk: a `KVPackCache` saved with its token ids and model fingerprint, loaded back bit for bit.

A file is a standard safetensors file, written and read by the `safetensors` library (nothing is pickled).
Its metadata entry `kvpack` holds the kvpack header, a JSON object (`CacheFileHeader`): format name and schema
version, the kvpack version that wrote it, the cache config, the token ids of the cached prefix, the model's
fingerprint (`ModelFingerprint`), one entry per decoder layer (token counts) and a SHA-256 checksum over the
header and every tensor. Tensors are `layers.<i>.<name>` for each tensor of the layer's `LayerState` (only
valid tokens: packed codes, scales and zeros (and outliers' values and positions with `-o`), the exact residual
window, sinks), in the model's dtype.

Reading trusts nothing in the file. The library checks the framing (header length within the file and its own
limit, JSON, dtypes, shapes and offsets that tile the data exactly) before it reads a tensor, so what a file makes
kvpack allocate is bounded by its size; then kvpack checks its header's fields, the checksum before any count or
tensor is used, the counts and every tensor's dtype and shape against the header, and the fingerprint against the
model before anything is restored. Each failure raises a `CacheFileError` subclass whose `check` names what
failed: `file`, `truncated`, `header`, `format`, `schema`, `checksum`, `layers` (the file); `architecture`,
`shapes`, `dtype`, `config`, `weights`, `tokenizer`, `context` (the model).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin, get_type_hints

import torch

from kvpack.cache.layer import FLOAT_DTYPES, LayerState, PackedLayer, PackedSlidingLayer
from kvpack.cache.plan import cache_shape, check_exact_tokens, context_limit
from kvpack.cache.storage import PackedBuffer
from kvpack.compat import cache_kwargs
from kvpack.config import DEFAULT_PRESET, CacheConfig, QuantSpec
from kvpack.errors import (
    CacheChecksumError,
    CacheFileError,
    CacheFormatError,
    CacheModelMismatchError,
    CacheVersionError,
    ConfigError,
    KVPackError,
)
from kvpack.quant.tensor import PackedTensor
from kvpack.version import __version__

if TYPE_CHECKING:
    from kvpack.cache.cache import KVPackCache

FORMAT = "kvpack.prompt-cache"
SCHEMA_VERSION = 1
# The safetensors library's own limit on the JSON header (its MAX_HEADER_SIZE): a longer one is refused unread.
MAX_HEADER_BYTES = 100_000_000
# Bounds on kv heads and head dims read from a file (real models have tens and hundreds), so that the shapes built
# from them stay within torch's index range.
MAX_HEADS_OR_DIM = 1 << 16
# What the header's fields may hold beyond their types (checked by `_read`): (low, high) bounds an int (else
# `_COUNT`) or a list's length (else none), a pattern a string (else at most 4096 characters).
_COUNT = (0, 1 << 62)
_HeadsOrDim = Annotated[int, (1, MAX_HEADS_OR_DIM)]
_TokenId = Annotated[int, (0, (1 << 31) - 1)]
_Sha256 = Annotated[str, re.compile("[0-9a-f]{64}")]
_PER_LAYER = (0, 1 << 16)
_LayerKind = Annotated[str, re.compile("full|none|sliding:[1-9][0-9]{0,9}")]

# The dtypes a prompt cache holds, by their safetensors names (the checksum spells them so).
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
_DENSE_TENSORS = ("sink_keys", "sink_values", "residual_keys", "residual_values", "shadow_keys", "shadow_values")
# Config fields that say how the model is run, not what it computes: left out of the config hash.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions", "output_hidden_states",
     "return_dict", "attn_implementation"}
)  # fmt: skip
# Elements sampled from each weight tensor for the weights hash: enough to tell checkpoints and fine-tunes apart.
WEIGHT_SAMPLES = 64


# -- the model fingerprint ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the model (and tokenizer) a cache was computed with.

    name: a label for people (`kvpack cache info`), not checked. architecture: the model class and model_type.
    layer_plan: per decoder layer, `full`, `sliding:<window>` or `none` (no cache). kv_heads, head_dim: the cached
    tensors' shape. dtype: the model's dtype (the cache's exact tokens are in it). config_sha256: the model config
    without the fields that only say how it is run. weights_sha256: names, shapes, dtypes and `WEIGHT_SAMPLES`
    evenly spaced elements of every tensor of the state dict. tokenizer_sha256: the tokenizer's vocabulary, merges,
    normalizer, pre-tokenizer, post-processor and added tokens (None when saved without a tokenizer).
    """

    name: str
    architecture: str
    layer_plan: Annotated[tuple[_LayerKind, ...], _PER_LAYER]
    kv_heads: _HeadsOrDim
    head_dim: _HeadsOrDim
    dtype: str
    config_sha256: _Sha256
    weights_sha256: _Sha256
    tokenizer_sha256: _Sha256 | None

    @classmethod
    def of(cls, model: Any, tokenizer: Any = None, name: str | None = None) -> ModelFingerprint:
        """The fingerprint of `model` (a transformers model) and, when given, `tokenizer`."""
        config = model.config
        shape = cache_shape(config)
        return cls(
            name=name or str(getattr(config, "_name_or_path", "") or type(model).__name__),
            architecture=f"{type(model).__name__} ({getattr(config, 'model_type', '?')})",
            layer_plan=tuple(
                "none" if kind == "dummy" else "full" if window is None else f"sliding:{window}"
                for kind, window in shape.plan
            ),
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            dtype=str(model.dtype).removeprefix("torch."),
            config_sha256=config_sha256(config),
            weights_sha256=weights_sha256(model),
            tokenizer_sha256=None if tokenizer is None else tokenizer_sha256(tokenizer),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layer_plan": list(self.layer_plan)}


def config_sha256(config: Any) -> str:
    """SHA-256 of the model config as sorted JSON, without private fields and `_VOLATILE_CONFIG_KEYS`."""

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                str(k): stable(v)
                for k, v in value.items()
                if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG_KEYS
            }
        if isinstance(value, list | tuple):
            return [stable(v) for v in value]
        return value

    text = json.dumps(stable(config.to_dict()), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(model: Any) -> str:
    """SHA-256 of every state-dict tensor's name, shape and dtype and `WEIGHT_SAMPLES` evenly spaced elements.

    Device-independent (the sampled elements' bytes, read on the CPU). Tensors that cannot be sampled (on the
    meta device, or quantized tensor subclasses without `dequantize`) contribute their name, shape and type only.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{type(tensor).__name__}\n".encode())
        sample = _weight_sample(tensor)
        if sample is not None:
            digest.update(_bytes_of(sample))
    return digest.hexdigest()


def _weight_sample(tensor: torch.Tensor) -> torch.Tensor | None:
    if tensor.device.type == "meta":
        return None
    data = tensor.detach()
    if type(data) is not torch.Tensor:  # e.g. optimum-quanto's quantized weights
        dequantize = getattr(data, "dequantize", None)
        if dequantize is None:
            return None
        data = dequantize()
    flat = data.reshape(-1)
    if flat.numel() == 0:
        return None
    index = torch.linspace(0, flat.numel() - 1, min(WEIGHT_SAMPLES, flat.numel()), dtype=torch.float64)
    return flat[index.round().long().to(flat.device)].cpu()


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 of what maps text to token ids: the tokenizer's model (vocabulary, merges), normalizer, pre-tokenizer,
    post-processor, decoder and added tokens. Deterministic across processes (serialized in id order by the
    `tokenizers` library); padding and truncation settings, which change at run time, are left out."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        for part in (backend.model, backend.normalizer, backend.pre_tokenizer, backend.post_processor, backend.decoder):
            digest.update(b"none" if part is None else part.__getstate__())
            digest.update(b"\n")
        for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
            digest.update(f"{token_id}|{token.content}|{token.special}\n".encode())
    else:  # a slow (pure Python) tokenizer: its vocabulary and special tokens
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])):
            digest.update(f"{token_id}|{token}\n".encode())
        digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()


# -- the header ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEntry:
    """One decoder layer in the header. kind: `full`, `sliding` or `none` (a layer without a cache); the counts are
    the `LayerState`'s: tokens received, and tokens held as sinks, packed, in the residual window, in the shadow."""

    kind: Literal["full", "sliding", "none"]
    seen_tokens: int = 0
    sink_len: int = 0
    packed_len: int = 0
    residual_len: int = 0
    shadow_len: int = 0
    record_past: bool = False


@dataclass(frozen=True)
class CacheFileHeader:
    """The kvpack header of a prompt-cache file (JSON in the safetensors metadata).

    token_ids: `[batch][tokens]`, the tokens the cache holds. prefill_s: how long the prefill took when the file
    was built (on that machine; informative, may be None). checksum: SHA-256 over this header without the checksum
    and every tensor (name, dtype, shape, bytes) in name order.
    """

    kvpack_version: str
    created: str
    cache_config: CacheConfig
    token_ids: tuple[tuple[_TokenId, ...], ...]
    model: ModelFingerprint
    layers: Annotated[tuple[LayerEntry, ...], _PER_LAYER]
    prefill_s: float | None
    checksum: _Sha256
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT

    @property
    def batch(self) -> int:
        return len(self.token_ids)

    @property
    def tokens(self) -> int:
        return len(self.token_ids[0])

    def to_dict(self, with_checksum: bool = True) -> dict[str, Any]:
        data = {
            "format": self.format,
            "schema_version": self.schema_version,
            "kvpack_version": self.kvpack_version,
            "created": self.created,
            "cache_config": self.cache_config.to_dict(),
            "token_ids": [list(row) for row in self.token_ids],
            "model": self.model.to_dict(),
            "layers": [asdict(entry) for entry in self.layers],
            "prefill_s": self.prefill_s,
        }
        if with_checksum:
            data["checksum"] = self.checksum
        return data

    @classmethod
    def from_dict(cls, data: Any) -> CacheFileHeader:
        """Parse and validate a header; the format name and schema version are checked first."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CacheFormatError(f"it is not a kvpack prompt cache (no {FORMAT!r} header)", "format")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheVersionError(
                f"it has prompt-cache schema version {version!r} (written by kvpack {data.get('kvpack_version')!r}), "
                f"and this kvpack reads version {SCHEMA_VERSION}",
                "schema",
            )
        # The version, checked above (where 1.0 and true equal 1), is kept as this kvpack writes it.
        header: CacheFileHeader = _read(cls, {**data, "schema_version": SCHEMA_VERSION}, "")
        rows = header.token_ids
        if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
            raise _header_error("token_ids must be one or more rows of the same, non-zero length")
        return header

    def fp16_nbytes(self) -> int:
        """Bytes a float16 `DynamicCache` holds for these tokens (sliding layers: their window)."""
        per_token = self.batch * self.model.kv_heads * self.model.head_dim * 2 * 2
        total = 0
        for entry, kind in zip(self.layers, self.model.layer_plan, strict=True):
            if entry.kind == "full":
                total += per_token * entry.seen_tokens
            elif entry.kind == "sliding":
                total += per_token * min(entry.seen_tokens, int(kind.split(":")[1]) - 1)
        return total


@dataclass
class CacheFile:
    """A prompt-cache file read and checked (format, schema, checksum, layer layout), not yet tied to a model.

    tensors: name -> CPU tensor, copies of the file's bytes. nbytes: the file's size.
    """

    path: Path
    header: CacheFileHeader
    tensors: dict[str, torch.Tensor]
    nbytes: int

    def layer_states(self) -> Iterator[tuple[int, LayerState]]:
        """(layer index, its state) of each layer with a cache, tensors on the CPU."""
        for idx, template in _layer_templates(self.header).items():
            state = _with_tensors(template, self.tensors, prefix=f"layers.{idx}.")
            for name in ("packed_keys", "packed_values"):
                packed = getattr(state, name)
                # Positions index the group when read: each must be in it, distinct and in order (as written).
                if packed is not None and not _increasing_within(packed.outlier_positions, packed.spec.group_size):
                    raise CacheFormatError(
                        f"{self.path}: layer {idx} {name}: outlier positions are not increasing positions in "
                        f"groups of {packed.spec.group_size}. {_ADVICE[CacheFormatError]}",
                        "layers",
                    )
            yield idx, state


def _layer_templates(header: CacheFileHeader) -> dict[int, LayerState]:
    """Each cached layer's state by the header's counts, on the meta device: the names, dtypes and shapes of the
    tensors a file holds for it, as the layer lays them out (layers without a cache left out)."""
    fp, meta = header.model, torch.device("meta")
    batch, heads, dim = header.batch, fp.kv_heads, fp.head_dim

    def packed(spec: QuantSpec, tokens: int) -> PackedTensor | None:
        if not tokens:
            return None
        buffer = PackedBuffer(spec, batch, heads, dim, meta)  # laid out as a layer stores it
        units = tokens // buffer.unit_tokens
        grown = buffer.view().map_parts(lambda t: t.new_empty((*t.shape[:2], units, *t.shape[3:])))
        return replace(grown, shape=torch.Size((batch, heads, tokens, dim)))

    templates = {}
    for idx, entry in enumerate(header.layers):
        if entry.kind == "none":
            continue
        dtype = _DTYPE_NAMES.get(fp.dtype)
        if dtype is None:
            raise _header_error(f"model.dtype {fp.dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
        lengths = {"sink": entry.sink_len, "residual": entry.residual_len, "shadow": entry.shadow_len}
        dense: dict[str, Any] = {
            name: torch.empty((batch, heads, lengths[name.split("_")[0]], dim), dtype=dtype, device=meta)
            for name in _DENSE_TENSORS
        }
        config = header.cache_config.for_layer(idx)
        templates[idx] = LayerState(
            seen_tokens=entry.seen_tokens,
            packed_keys=packed(config.key, entry.packed_len),
            packed_values=packed(config.value, entry.packed_len),
            record_past=entry.record_past,
            **dense,
        )
    return templates


def _with_tensors(state: LayerState, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> LayerState:
    """`state` with each of its tensors replaced by `tensors[prefix + its name in LayerState.tensors()]`."""

    def packed(name: str) -> PackedTensor | None:
        value: PackedTensor | None = getattr(state, name)
        if value is None:
            return None
        parts: dict[str, Any] = {part: tensors[f"{prefix}{name}.{part}"] for part in value.parts()}
        return replace(value, **parts)

    dense: dict[str, Any] = {name: tensors[prefix + name] for name in _DENSE_TENSORS}
    return replace(state, **dense, packed_keys=packed("packed_keys"), packed_values=packed("packed_values"))


def _increasing_within(positions: torch.Tensor | None, group_size: int) -> bool:
    """Whether each row (last dimension) of `positions` increases strictly and stays below `group_size`."""
    if positions is None or not positions.numel():
        return True
    return int(positions.max()) < group_size and bool((positions.diff(dim=-1) > 0).all())


# -- saving ----------------------------------------------------------------------------------------------------------


def save_cache(
    cache: KVPackCache,
    path: str | os.PathLike[str],
    model: Any,
    token_ids: Any = None,
    tokenizer: Any = None,
    prefill_s: float | None = None,
    name: str | None = None,
) -> CacheFileHeader:
    """Write `cache` to `path` (see the module docstring); returns the header written. See `KVPackCache.save`."""
    import safetensors.torch

    seq_len = cache.get_seq_length()
    if seq_len == 0:
        raise KVPackError("the cache holds no tokens; run the prefix through the model with it first, then save.")
    if token_ids is None:
        token_ids = cache.prefix_ids
        prefill_s = cache.prefill_s if prefill_s is None else prefill_s
    if token_ids is None:
        raise KVPackError("pass token_ids: the ids of the tokens the cache holds ([batch, tokens]).")
    ids = torch.as_tensor(token_ids).detach().cpu()
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    fingerprint = ModelFingerprint.of(model, tokenizer, name)
    entries, tensors = [], {}
    batch = None
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, PackedLayer):
            entries.append(LayerEntry(kind="none"))
            continue
        if not layer.is_initialized or layer.seen_tokens != seq_len:
            raise KVPackError(
                f"layer {idx} holds {layer.seen_tokens} tokens, not the {seq_len} of layer 0; save a cache that "
                "went through whole forward passes of the model."
            )
        state = layer.state()
        batch = state.residual_keys.shape[0]
        entries.append(
            LayerEntry(
                kind="sliding" if isinstance(layer, PackedSlidingLayer) else "full",
                seen_tokens=state.seen_tokens,
                sink_len=state.sink_keys.shape[2],
                packed_len=0 if state.packed_keys is None else state.packed_keys.shape[2],
                residual_len=state.residual_keys.shape[2],
                shadow_len=state.shadow_keys.shape[2],
                record_past=state.record_past,
            )
        )
        for tensor_name, tensor in state.tensors().items():
            tensors[f"layers.{idx}.{tensor_name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    if ids.dim() != 2 or tuple(ids.shape) != (batch, seq_len) or ids.is_floating_point():
        raise KVPackError(
            f"token_ids must be integer ids of shape [batch={batch}, tokens={seq_len}] (what the cache holds), "
            f"got {tuple(ids.shape)} {ids.dtype}."
        )
    header = CacheFileHeader(
        kvpack_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cache_config=cache.cache_config,
        token_ids=tuple(tuple(int(t) for t in row) for row in ids.tolist()),
        model=fingerprint,
        layers=tuple(entries),
        prefill_s=prefill_s,
        checksum="0" * 64,
    )
    try:  # the file must pass the reader's own checks: a model whose layers do not match its fingerprint fails here
        _check_tensors(header, tensors)
    except CacheFormatError as exc:
        raise KVPackError(
            f"cannot save this cache: {exc}; kvpack saves caches of models whose layers all cache "
            f"[batch, kv_heads={fingerprint.kv_heads}, tokens, head_dim={fingerprint.head_dim}] in its dtype."
        ) from None
    _check_layers(header)
    header = replace(header, checksum=content_sha256(header, tensors))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # `save` + a plain write rather than `save_file`, which creates the file readable by its owner only.
        tmp.write_bytes(safetensors.torch.save(tensors, metadata={"kvpack": json.dumps(header.to_dict())}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return header


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype), without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy arrays are buffers


def content_sha256(header: CacheFileHeader, tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum a file carries: SHA-256 of the canonical header JSON (without the checksum), then each tensor's
    name, safetensors dtype, shape and bytes, in name order. Tensors: contiguous CPU tensors of `_ST_NAMES` dtypes."""
    digest = hashlib.sha256()
    canonical = json.dumps(header.to_dict(with_checksum=False), sort_keys=True, separators=(",", ":"))
    digest.update(canonical.encode())
    for name, tensor in sorted(tensors.items()):
        data = _bytes_of(tensor)
        digest.update(f"\n{name}|{_ST_NAMES[tensor.dtype]}|{list(tensor.shape)}|{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


# -- reading -------------------------------------------------------------------------------------------------------


def read_cache_file(path: str | os.PathLike[str]) -> CacheFile:
    """Read a prompt-cache file and check it on its own: framing, format, schema, checksum, layer layout.

    Nothing is allocated beyond the file's own size before the checks pass. Raises a `CacheFileError` subclass.
    """
    path = Path(path)
    try:
        metadata, tensors, nbytes = _read_safetensors(path)
        if "kvpack" not in metadata:
            raise CacheFormatError(f"it is not a kvpack prompt cache (no {FORMAT!r} header)", "format")
        try:
            data = json.loads(metadata["kvpack"])
        except (ValueError, RecursionError) as exc:
            raise CacheFormatError(f"its kvpack header is not valid JSON ({type(exc).__name__})", "header") from None
        header = CacheFileHeader.from_dict(data)
        for name, tensor in tensors.items():
            if tensor.dtype not in _ST_NAMES:
                raise _header_error(f"tensor {name!r} has dtype {tensor.dtype}, not one of {list(_ST_NAMES.values())}")
        if content_sha256(header, tensors) != header.checksum:
            raise CacheChecksumError(
                "its content does not match the checksum written with it: it is corrupt or was modified", "checksum"
            )
        _check_layers(header)
        _check_tensors(header, tensors)
    except CacheFileError as exc:
        raise type(exc)(f"{path}: {exc}. {_ADVICE[type(exc)]}", exc.check) from None
    return CacheFile(path=path, header=header, tensors=tensors, nbytes=nbytes)


_ADVICE = {
    CacheFormatError: "Rebuild it (`kvpack cache build`, or cache.save after a prefill), or re-copy the original.",
    CacheVersionError: "Rebuild it with this kvpack (`kvpack cache build`), or load it with the kvpack that wrote it.",
    CacheChecksumError: "Do not use it; rebuild it or re-copy the original.",
    CacheModelMismatchError: "Load it with the model (and tokenizer) it was built with, or rebuild it for this one.",
}
# The library's errors for data shorter or longer than the header says (0.4's names, then later versions' words),
# compared with letters only.
_TRUNCATED = ("headertoosmall", "invalidheaderlength", "metadataincompletebuffer", "filenotfullycovered")


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor], int]:
    """The metadata, the tensors and the size of a safetensors file, its framing checked by the library."""
    from safetensors import SafetensorError, safe_open

    try:
        nbytes = path.stat().st_size
        with safe_open(path, framework="pt") as file:
            # get_tensor's tensors view the file's memory map, which follows later writes to the file: copy.
            tensors = {name: file.get_tensor(name).clone() for name in file.keys()}  # noqa: SIM118
            return file.metadata() or {}, tensors, nbytes
    except OSError as exc:
        raise CacheFormatError(f"cannot read prompt cache {path}: {exc.strerror or exc}", "file") from None
    # torch refuses shapes whose strides overflow, even of empty tensors (the library checks only the bytes).
    except (SafetensorError, RuntimeError, TypeError, ValueError) as exc:
        detail = str(exc).split("\n")[0].removeprefix("Error while deserializing header: ")
        if any(key in re.sub("[^a-z]", "", detail.lower()) for key in _TRUNCATED):
            raise CacheFormatError(
                f"it is truncated, or has bytes after its tensors (safetensors: {detail})", "truncated"
            ) from None
        raise CacheFormatError(f"it is not a valid safetensors file (safetensors: {detail})", "header") from None


def _check_tensors(header: CacheFileHeader, tensors: Mapping[str, torch.Tensor]) -> None:
    """The tensors are those the header's layers hold (`_layer_templates`): names, dtypes and shapes."""
    found = {name: (t.dtype, t.shape) for name, t in tensors.items()}
    expected = {
        f"layers.{idx}.{name}": (t.dtype, t.shape)
        for idx, template in _layer_templates(header).items()
        for name, t in template.tensors().items()
    }
    if found != expected:
        missing = sorted(set(expected) - set(found))
        wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
        extra = sorted(set(found) - set(expected))
        raise CacheFormatError(
            f"its tensors do not match its layers (missing {missing[:3]}, wrong shape {wrong[:3]}, "
            f"unexpected {extra[:3]})",
            "layers",
        )


def _check_layers(header: CacheFileHeader) -> None:
    """Every layer's counts are ones a layer can have after receiving the header's tokens (see `PackedLayer`)."""
    config = header.cache_config
    block = config.block_tokens
    window = config.residual + block
    plan = header.model.layer_plan
    if len(plan) != len(header.layers):
        raise CacheFormatError(f"it has {len(header.layers)} layers, but its model has {len(plan)}", "layers")
    if config.layer_bits and len(config.layer_bits) != len(plan):
        raise CacheFormatError(
            f"its cache config has per-layer bits for {len(config.layer_bits)} layers, but its model has {len(plan)}",
            "layers",
        )
    for spec, name in ((config.key, "key"), (config.value, "value")):
        if spec.axis == "token" and header.model.head_dim % spec.group_size:
            raise CacheFormatError(f"head_dim {header.model.head_dim} does not fit the {name} group", "layers")
    for idx, (entry, kind) in enumerate(zip(header.layers, plan, strict=True)):
        expected_kind = "none" if kind == "none" else "full" if kind == "full" else "sliding"
        problems = []
        if entry.kind != expected_kind:
            problems.append(f"kind {entry.kind} where the model's layer is {kind}")
        elif entry.kind != "none":
            stored = entry.sink_len + entry.packed_len + entry.residual_len
            sinks = config.sinks if entry.kind == "full" else 0
            if entry.seen_tokens != header.tokens:
                problems.append(f"{entry.seen_tokens} tokens seen, the file holds {header.tokens} token ids")
            if stored != entry.seen_tokens if entry.kind == "full" else not 0 < stored <= entry.seen_tokens:
                problems.append(f"{stored} tokens stored of {entry.seen_tokens} seen")
            if entry.sink_len > sinks or (entry.sink_len < sinks and entry.packed_len + entry.residual_len):
                problems.append(f"{entry.sink_len} sink tokens with {sinks} sinks configured")
            if entry.packed_len % block:
                problems.append(f"{entry.packed_len} packed tokens, not whole blocks of {block}")
            if entry.residual_len >= window:
                problems.append(f"{entry.residual_len} residual tokens, the window holds fewer than {window}")
            if (
                entry.shadow_len not in (0, block)
                or entry.shadow_len > entry.packed_len
                or (entry.shadow_len and not entry.record_past)
            ):
                problems.append(f"a shadow block of {entry.shadow_len} tokens")
        if problems:
            raise CacheFormatError(f"layer {idx} is inconsistent: {'; '.join(problems)}", "layers")


# -- loading into a model --------------------------------------------------------------------------------------------


def check_model(file: CacheFile, model: Any, tokenizer: Any = None) -> ModelFingerprint:
    """Raise `CacheModelMismatchError` naming the first fingerprint field where `file` and `model` differ.

    The tokenizer is checked when both the file and the call have one. Returns the model's fingerprint.
    """
    ours, theirs = ModelFingerprint.of(model, tokenizer), file.header.model
    checks = {  # check -> (the fields it compares, what differs when they do), in this order
        "architecture": (("architecture",), f"architecture {theirs.architecture} vs {ours.architecture}"),
        "shapes": (
            ("layer_plan", "kv_heads", "head_dim"),
            f"layers/kv heads/head dim {_shape_text(theirs)} vs {_shape_text(ours)}",
        ),
        "dtype": (("dtype",), f"dtype {theirs.dtype} vs {ours.dtype} (load the model in {theirs.dtype})"),
        "config": (("config_sha256",), "the model config"),
        "weights": (("weights_sha256",), "the weights (another checkpoint, fine-tune or weight quantization)"),
    }
    if theirs.tokenizer_sha256 is not None and ours.tokenizer_sha256 is not None:
        checks["tokenizer"] = (("tokenizer_sha256",), "the tokenizer")
    for check, (names, what) in checks.items():
        if any(getattr(theirs, name) != getattr(ours, name) for name in names):
            raise CacheModelMismatchError(
                f"{file.path}: it was built for another model ({theirs.name}): {what} differs. "
                f"{_ADVICE[CacheModelMismatchError]}",
                check,
            )
    return ours


def _shape_text(fp: ModelFingerprint) -> str:
    return f"{len(fp.layer_plan)} layers ({', '.join(sorted(set(fp.layer_plan)))}) x {fp.kv_heads} x {fp.head_dim}"


def load_cache(path: str | os.PathLike[str], model: Any, tokenizer: Any = None, backend: str = "auto") -> KVPackCache:
    """Read `path`, check it and the model, and rebuild the cache on the model's devices. See `KVPackCache.load`."""
    from kvpack.cache.cache import KVPackCache

    file = read_cache_file(path)
    check_model(file, model, tokenizer)
    header = file.header
    config = header.cache_config
    try:  # the rule every KVPackCache keeps, reported as a file error
        check_exact_tokens(config, context_limit(model.config))
    except ConfigError as exc:
        raise CacheFormatError(f"{file.path}: {exc} {_ADVICE[CacheFormatError]}", "context") from exc
    cache = KVPackCache(model, config, backend=backend)
    devices = layer_devices(model, len(cache.layers))
    for idx, state in file.layer_states():
        layer = cache.layers[idx]
        assert isinstance(layer, PackedLayer)
        layer.restore(_with_tensors(state, {name: t.to(devices[idx]) for name, t in state.tensors().items()}))
    cache.prefix_ids = torch.tensor(header.token_ids, dtype=torch.long)
    cache.prefill_s = header.prefill_s
    return cache


def layer_devices(model: Any, n_layers: int) -> list[torch.device]:
    """The device of each decoder layer's weights (a per-layer device map puts them apart), else the model's."""
    fallback = torch.device(model.device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) != n_layers:
        return [fallback] * n_layers
    devices = []
    for layer in layers:
        hook = getattr(layer, "_hf_hook", None)  # accelerate: where the layer runs when its weights are offloaded
        device = getattr(hook, "execution_device", None)
        if device is None:
            param = next(layer.parameters(), None)
            device = param.device if param is not None and param.device.type != "meta" else fallback
        devices.append(torch.device(device))
    return devices


def prefix_cache(
    model: Any, input_ids: Any, cache_config: CacheConfig | str = DEFAULT_PRESET, backend: str = "auto"
) -> KVPackCache:
    """A `KVPackCache` holding `input_ids` (`[batch, tokens]` or a list of ids): the prefill of a reusable prefix.

    The returned cache's `prefix_ids` are the ids (on the CPU; `cache.save(path, model)` needs no more), and
    `prefill_s` the seconds the prefill took. Only the cache is kept (the last position's logits are dropped).
    """
    from kvpack.cache.cache import KVPackCache

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(model.device)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise KVPackError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}.")
    cache = KVPackCache(model, cache_config, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    cache.prefill_s = time.perf_counter() - start
    cache.prefix_ids = ids.cpu()
    return cache


# -- reading the header's fields by their types --------------------------------------------------------------------


def _header_error(detail: str) -> CacheFormatError:
    return CacheFormatError(f"its header is malformed: {detail}", "header")


def _read(hint: Any, value: Any, where: str) -> Any:
    """`value`, from the header's JSON, as the type `hint` (a field's annotation) says, or a `header` error naming
    `where`. A dataclass is an object with exactly its fields, a tuple a list (of a length within its `Annotated`
    bounds), a `Literal` one of its values, `X | None` null or an X, a `CacheConfig` what its `from_dict` reads, a
    bool, float, int or str as `_scalar` reads it."""
    hint, bound = get_args(hint) if get_origin(hint) is Annotated else (hint, None)
    origin, args = get_origin(hint), get_args(hint)
    if type(None) in args:  # X | None
        return None if value is None else _read(args[0], value, where)
    if hint is CacheConfig:
        try:
            return CacheConfig.from_dict(value)
        except (ConfigError, TypeError, ValueError, AttributeError) as exc:
            raise _header_error(f"{where} is invalid: {exc}") from exc
    if isinstance(hint, type) and is_dataclass(hint):
        names = [field.name for field in fields(hint)]
        if not isinstance(value, dict) or set(value) != set(names):
            got = sorted(map(str, value))[:12] if isinstance(value, dict) else type(value).__name__
            raise _header_error(f"{where or 'header'} must be an object with fields {sorted(names)}, got {got}")
        hints = _type_hints(hint)
        return hint(**{name: _read(hints[name], value[name], f"{where}.{name}".lstrip(".")) for name in names})
    if origin is tuple:
        if not isinstance(value, list) or (bound and not bound[0] <= len(value) <= bound[1]):
            raise _header_error(f"{where} must be a list" + (f" of at most {bound[1]} items" if bound else ""))
        item, item_bound = get_args(args[0]) if get_origin(args[0]) is Annotated else (args[0], None)
        if item in _SCALARS:  # typed once, named by the list: a header may hold millions of token ids
            named = f"{where}[]"
            return tuple(_scalar(item, v, named, item_bound) for v in value)
        return tuple(_read(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise _header_error(f"{where} is {str(value)[:40]!r}, not one of {', '.join(args)}")
        return value
    return _scalar(hint, value, where, bound)


_SCALARS = (int, str, bool, float)
_type_hints = functools.cache(functools.partial(get_type_hints, include_extras=True))


def _scalar(hint: type, value: Any, where: str, bound: Any) -> Any:
    """`value` as `hint`: an int within `bound` (else `_COUNT`), a str matching `bound` (a pattern, else of at
    most 4096 characters), a bool, or a float (from any number)."""
    if hint is int:
        low, high = bound or _COUNT
        if type(value) is int and low <= value <= high:
            return value
        raise _header_error(f"{where} must be an integer in [{low}, {high}], got {str(value)[:40]}")
    if hint is str:
        if isinstance(value, str) and (bound.fullmatch(value) if bound else len(value) <= 4096):
            return value
        raise _header_error(
            f"{where} must be a string " + (f"matching {bound.pattern}" if bound else "(of at most 4096 characters)")
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _header_error(f"{where} must be true or false")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _header_error(f"{where} must be a number or null")
