"""One layer's packed KV cache: full-precision sinks + packed blocks + full-precision residual window."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvpack.attention.inputs import INPUTS_ATTRIBUTE, AttentionInputs
from kvpack.cache.plan import check_head_dims, dropped_tokens, exact_capacity, flushed_tokens
from kvpack.cache.storage import PackedBuffer
from kvpack.config import CacheConfig
from kvpack.errors import DtypeDeviceError, ShapeError, UnsupportedOperationError
from kvpack.quant.tensor import PackedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Decode steps and assisted-decoding candidates take the fused path; longer chunks (prefills) the dense one.
FUSED_MAX_NEW_TOKENS = 16


@dataclass
class LayerState:
    """Everything one layer holds that decides what it does next: what `PackedLayer.state` returns and
    `PackedLayer.restore` takes back, bit for bit (a saved prompt cache is a list of these).

    Tensors are `[batch, kv_heads, n, head_dim]` in the model's dtype, holding only the valid tokens (no spare
    capacity): `sink_*` the first `sink_len` tokens, `residual_*` the exact window, `shadow_*` the last packed
    block kept exactly while past recording is on (`shadow_len` tokens, else none). `packed_*`: the packed
    tokens, oldest first (None when nothing is packed). `seen_tokens` counts every token the layer received,
    including those a sliding-window layer has dropped.
    """

    seen_tokens: int
    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    residual_keys: torch.Tensor
    residual_values: torch.Tensor
    packed_keys: PackedTensor | None
    packed_values: PackedTensor | None
    shadow_keys: torch.Tensor
    shadow_values: torch.Tensor
    record_past: bool

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by name (`sink_keys`, ..., `packed_keys.codes`, ...), views of the layer's."""
        named = {
            "sink_keys": self.sink_keys,
            "sink_values": self.sink_values,
            "residual_keys": self.residual_keys,
            "residual_values": self.residual_values,
            "shadow_keys": self.shadow_keys,
            "shadow_values": self.shadow_values,
        }
        for name, packed in (("packed_keys", self.packed_keys), ("packed_values", self.packed_values)):
            if packed is not None:
                named |= {f"{name}.{part}": t for part, t in packed.parts().items()}
        return named


class PackedLayer(CacheLayerMixin):
    """The cache of one full-attention layer, for tensors `[batch, kv_heads, tokens, head_dim]`.

    Tokens arrive in order and go, in this order, to:
      1. the sinks: the first `config.sinks` tokens, kept exactly;
      2. the residual window: the newest tokens, kept exactly in the model's dtype, in a buffer that grows as
         it fills, up to `residual + block_tokens` tokens (one buffer holds the sinks and then the window);
      3. the packed buffers: whenever the residual holds at least `residual + block_tokens` tokens, its
         oldest whole blocks are quantized, once, and appended. The newest `residual` tokens are never
         quantized, at prefill too.

    `update` returns dense keys/values (the reference path: packed tokens dequantized, concatenated with
    sinks and residual), which the model's own attention consumes.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, config: CacheConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self._init_state()

    def _init_state(self) -> None:
        self.is_initialized = False
        self.seen_tokens = 0
        self.sink_len = 0
        self.residual_len = 0
        # One buffer per tensor holds the sinks, then the residual window right after them, so that attention
        # reads every exact token as one view (no per-step concatenation); `sink_*` and `residual_*` are views.
        self.exact_keys = self.exact_values = torch.empty(0)
        self.sink_keys = self.sink_values = torch.empty(0)
        self.residual_keys = self.residual_values = torch.empty(0)
        self.packed_keys: PackedBuffer | None = None
        self.packed_values: PackedBuffer | None = None
        # With past recording on (transformers turns it on for assisted decoding), the most recently packed
        # block is also kept exactly, so a rollback can un-pack it and keep `residual` tokens exact.
        self.record_past = False
        self.shadow_len = 0
        self.shadow_keys = self.shadow_values = torch.empty(0)
        self.attention_memo: dict[Any, Any] = {}  # attention's per-layer resolution (see AttentionInputs.memo)
        # A prefill held exactly until a press has pruned it (`hold_prefill`); None when nothing is held.
        self.holding = False
        self.held_keys: torch.Tensor | None = None
        self.held_values: torch.Tensor | None = None
        # The last dense keys/values `keys`/`values` handed out, so that assigning a prefix slice of them crops.
        self._handed_out: dict[str, weakref.ref[torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.spec}, tokens={self.seen_tokens})"

    # -- transformers' layer protocol -------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ShapeError(
                f"layer {self.layer_idx}: keys/values must be [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}."
            )
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ShapeError(
                f"layer {self.layer_idx}: keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} "
                "disagree on batch, heads or tokens."
            )
        if key_states.dtype not in FLOAT_DTYPES or value_states.dtype != key_states.dtype:
            raise DtypeDeviceError(
                f"layer {self.layer_idx}: keys/values must share one of {FLOAT_DTYPES}, got {key_states.dtype} "
                f"and {value_states.dtype}; load the model in float32, float16 or bfloat16."
            )
        batch, heads, _, key_dim = key_states.shape
        value_dim = value_states.shape[-1]
        check_head_dims(self.config, key_dim, value_dim, where=f"layer {self.layer_idx}: ")
        self.dtype, self.device = key_states.dtype, key_states.device
        # Empty: `_reserve_exact` grows them as tokens arrive.
        self.exact_keys = key_states.new_empty((batch, heads, 0, key_dim))
        self.exact_values = value_states.new_empty((batch, heads, 0, value_dim))
        self._split_exact()
        block = self.config.block_tokens
        self.shadow_keys = key_states.new_empty((batch, heads, block if self.record_past else 0, key_dim))
        self.shadow_values = value_states.new_empty((batch, heads, block if self.record_past else 0, value_dim))
        self.packed_keys = PackedBuffer(self.config.key, batch, heads, key_dim, self.device)
        self.packed_values = PackedBuffer(self.config.value, batch, heads, value_dim, self.device)
        self.is_initialized = True

    def _reserve_exact(self, tokens: int) -> None:
        """Make `exact_*` hold at least `tokens` tokens (the sinks, then the residual window from index `sinks`).

        The buffers grow as they fill, at least doubling, up to `sinks + residual + block_tokens`, so neither a short
        sequence nor a long configured window (or a prompt-cache file's config) allocates tokens the layer does not
        hold. Contents are kept; views taken earlier (`sink_*`, `residual_*`) are renewed.
        """
        capacity = self.exact_keys.shape[2]
        if tokens <= capacity:
            return
        grown = min(exact_capacity(self.config), max(tokens, 2 * capacity))
        keys = self.exact_keys.new_empty((*self.exact_keys.shape[:2], grown, self.exact_keys.shape[3]))
        values = self.exact_values.new_empty((*self.exact_values.shape[:2], grown, self.exact_values.shape[3]))
        keys[:, :, :capacity] = self.exact_keys
        values[:, :, :capacity] = self.exact_values
        self.exact_keys, self.exact_values = keys, values
        self._split_exact()

    def _exact_tokens(self, sink_len: int, residual_len: int) -> int:
        """Buffer tokens that `sink_len` sinks and `residual_len` residual tokens occupy (the residual starts after
        all configured sinks; it holds tokens only once they are full)."""
        return (self.config.sinks if residual_len else sink_len) + residual_len

    def _split_exact(self) -> None:
        """`sink_*` and `residual_*` as the views of `exact_*` they are."""
        sinks = self.config.sinks
        self.sink_keys, self.residual_keys = self.exact_keys[:, :, :sinks], self.exact_keys[:, :, sinks:]
        self.sink_values, self.residual_values = self.exact_values[:, :, :sinks], self.exact_values[:, :, sinks:]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return the dense keys/values of the whole sequence (reference path).

        The new tokens are returned exactly as given, the past as stored before this call: a prefill (or a
        chunk of candidate tokens) attends to itself in full precision, as in KIVI. What is *stored* does
        not depend on how the sequence was split into calls; what a query of a chunk sees may (tokens that
        single steps would already have packed can still be exact at the start of a chunk).
        """
        if self.holding:
            return self._hold(key_states, value_states)
        return self._store(key_states, value_states)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens; return the stored past (as before this call) followed by the new tokens."""
        if not self.is_initialized:
            self.append(key_states, value_states)
            return key_states, value_states
        self._check_input(key_states, value_states)
        past_keys, past_values = self._stored_parts()
        keys = torch.cat([*past_keys, key_states], dim=2)
        values = torch.cat([*past_values, value_states], dim=2)
        self._append(key_states, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        record_past = self.record_past
        self._init_state()
        self.record_past = record_past

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs: object) -> None:
        """Keep the last packed block exactly too, so `crop` can roll back without losing exact tokens.

        transformers calls this before assisted / prompt-lookup decoding. Costs one block of
        full-precision tokens per layer (counted in `nbytes()`). recurrent_states_to_keep (transformers >= 5.25):
        how many of the newest tokens a later `crop` may remove (the candidate tokens per step). This layer rolls
        back up to `residual` tokens exactly, so a larger count is refused here, before generation starts,
        rather than at the first rejected candidate. Other keyword arguments transformers may pass concern
        recurrent states, which an attention layer does not have.
        """
        if recurrent_states_to_keep is not None and recurrent_states_to_keep > self.config.residual:
            raise UnsupportedOperationError(
                f"layer {self.layer_idx}: assisted decoding may roll back {recurrent_states_to_keep} candidate tokens, "
                f"but only the newest {self.config.residual} are held exactly (the residual window): use "
                f"'-r{recurrent_states_to_keep}' or more in the cache spec, or fewer candidate tokens."
            )
        self.record_past = True
        if self.is_initialized and self.shadow_keys.shape[2] == 0:
            block = self.config.block_tokens
            self.shadow_keys = self.residual_keys.new_empty(
                (*self.residual_keys.shape[:2], block, self.residual_keys.shape[3])
            )
            self.shadow_values = self.residual_values.new_empty(
                (*self.residual_values.shape[:2], block, self.residual_values.shape[3])
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest `-tokens_to_remove` tokens (a positive value is the length to keep).

        Only full-precision tokens can be removed exactly (the residual window, and the sinks while nothing
        is packed); reaching into packed tokens raises `UnsupportedOperationError` and changes nothing.
        With past recording on, a rollback that would leave fewer than `residual` exact tokens un-packs the
        last block (kept exactly for this), so the layer ends as if the removed tokens had never arrived.
        """
        remove = self.check_crop(tokens_to_remove)
        if remove == 0:
            return
        from_residual = min(remove, self.residual_len)
        self.residual_len -= from_residual
        self.sink_len -= remove - from_residual
        self.seen_tokens -= remove
        if self.shadow_len and self.residual_len < self.config.residual and self.packed_length >= self.shadow_len:
            self._unpack_last_block()
        self.shadow_len = 0  # a rollback ends the recorded step

    def check_crop(self, tokens_to_remove: int) -> int:
        """Tokens `crop(tokens_to_remove)` would remove; raises `UnsupportedOperationError` if it cannot."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(self.seen_tokens - tokens_to_remove, 0)
        if remove == 0 or not self.is_initialized:
            return 0
        removable = self.residual_len + (self.sink_len if self.packed_length == 0 else 0)
        if remove > removable:
            raise UnsupportedOperationError(
                f"crop: cannot remove {remove} tokens from layer {self.layer_idx}: only the newest {removable} are "
                "held in full precision, the rest are quantized and cannot be restored exactly. Use a residual "
                f"window at least as long as the rollback you need (e.g. '-r{max(remove, 128)}' for assisted "
                "decoding with that many candidate tokens)."
            )
        return remove

    def _unpack_last_block(self) -> None:
        assert self.packed_keys is not None and self.packed_values is not None
        block = self.shadow_len
        keep = self.residual_len
        self._reserve_exact(self._exact_tokens(self.sink_len, block + keep))
        self.residual_keys[:, :, block : block + keep] = self.residual_keys[:, :, :keep].clone()
        self.residual_values[:, :, block : block + keep] = self.residual_values[:, :, :keep].clone()
        self.residual_keys[:, :, :block] = self.shadow_keys[:, :, :block]
        self.residual_values[:, :, :block] = self.shadow_values[:, :, :block]
        self.residual_len = block + keep
        self.packed_keys.drop_newest(block)
        self.packed_values.drop_newest(block)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map_batch(lambda t: t.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = indices.to(self.device) if isinstance(indices, torch.Tensor) else indices
            self._map_batch(lambda t: t[idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        raise UnsupportedOperationError(
            "cache offloading is not supported by kvpack's packed cache; the packed cache is already 3-8x smaller "
            "than the full-precision one, so leave `offloading` off."
        )

    def prefetch(self) -> None:
        self.offload()

    # -- kvpack ------------------------------------------------------------------------------------

    # -- pruning a prefill before it is packed (kvpack.press) --------------------------------------

    def hold_prefill(self) -> None:
        """Keep the next prefill exactly as it arrives, unpacked, until `release_prefill` (a press prunes it first).

        The layer must be empty. While it holds, `update` returns the tokens as given (a prefill attends to itself
        in full precision anyway) and `nbytes()` counts them; a second update before the release packs what is
        held as a prefill would have, then goes on as usual.
        """
        if self.is_initialized or self.holding:
            raise UnsupportedOperationError(
                f"layer {self.layer_idx} already holds tokens: a prefill can be held (and pruned) only on an empty "
                "layer; use a new cache or cache.reset()."
            )
        self.holding = True

    def _hold(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.held_keys is not None and self.held_values is not None:
            self.release_prefill(self.held_keys, self.held_values)
            return self._store(key_states, value_states)
        self.lazy_initialization(key_states, value_states)  # checks shapes and dtypes, as a first update does
        self._init_state()
        self.holding = True
        self.held_keys, self.held_values = key_states, value_states
        self.seen_tokens = key_states.shape[2]
        return key_states, value_states

    def release_prefill(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store `key_states`/`value_states` `[batch, kv_heads, n, head_dim]` in place of the held prefill, packed
        as a prefill of those `n` tokens would be (sinks, packed blocks, residual window); the layer then counts
        `n` tokens. A press passes what it kept of `held_keys`/`held_values` (any tokens, in any order)."""
        if not self.holding:
            raise UnsupportedOperationError(f"layer {self.layer_idx} holds no prefill to release.")
        record_past = self.record_past
        self._init_state()
        self.record_past = record_past
        self.append(key_states, value_states)

    @property
    def packed_length(self) -> int:
        return self.packed_keys.length if self.packed_keys is not None else 0

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new tokens `[batch, kv_heads, n, head_dim]`; quantizes whatever leaves the residual window.

        The update is atomic: if quantization refuses a value (`NonFiniteError`), the cache is unchanged.
        """
        fresh = not self.is_initialized
        if fresh:
            self.lazy_initialization(key_states, value_states)
        try:
            self._check_input(key_states, value_states)
            self._append(key_states, value_states)
        except Exception:
            if fresh:  # a refused first update leaves the layer as it was: uninitialised
                self.reset()
            raise

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """`append` of checked input to an initialised layer."""
        n_sink = min(self.config.sinks - self.sink_len, key_states.shape[2])
        keys, values = (
            (key_states, value_states) if not n_sink else (key_states[:, :, n_sink:], value_states[:, :, n_sink:])
        )
        n = keys.shape[2]
        stored = self.residual_len + n
        flush = flushed_tokens(stored, self.config)
        if flush:
            # Quantize before touching any state, so a refused value leaves the cache as it was.
            all_keys = torch.cat([self.residual_keys[:, :, : self.residual_len], keys], dim=2)
            all_values = torch.cat([self.residual_values[:, :, : self.residual_len], values], dim=2)
            packed_keys = PackedTensor.quantize(all_keys[:, :, :flush], self.config.key)
            packed_values = PackedTensor.quantize(all_values[:, :, :flush], self.config.value)
        self._reserve_exact(self._exact_tokens(self.sink_len + n_sink, stored - flush))
        if n_sink:
            end = self.sink_len + n_sink
            self.sink_keys[:, :, self.sink_len : end] = key_states[:, :, :n_sink]
            self.sink_values[:, :, self.sink_len : end] = value_states[:, :, :n_sink]
            self.sink_len = end
        if flush:
            assert self.packed_keys is not None and self.packed_values is not None
            self.packed_keys.append(packed_keys)
            self.packed_values.append(packed_values)
            keep = stored - flush
            if self.record_past:
                block = self.config.block_tokens
                self.shadow_len = block
                self.shadow_keys[:, :, :block] = all_keys[:, :, flush - block : flush]
                self.shadow_values[:, :, :block] = all_values[:, :, flush - block : flush]
            self.residual_keys[:, :, :keep] = all_keys[:, :, flush:]
            self.residual_values[:, :, :keep] = all_values[:, :, flush:]
            self.residual_len = keep
        else:
            self.shadow_len = 0  # the last packed block was packed by an earlier step
            self.residual_keys[:, :, self.residual_len : stored] = keys
            self.residual_values[:, :, self.residual_len : stored] = values
            self.residual_len = stored
        self.seen_tokens += key_states.shape[2]

    def fused_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return them with an `AttentionInputs` attached for kvpack's attention.

        What attention reads is what `update` would return (the stored past, then the new tokens exactly), but
        as views of the packed blocks and of the residual buffer, never dequantized. The returned key tensor
        carries it as `kvpack_inputs`; `kvpack.attention.kvpack_attention` consumes it. The first update of an
        empty layer (a prefill) and tokens that fill the sinks return plain tensors: attention over them needs
        no packed data. So do chunks of more than `FUSED_MAX_NEW_TOKENS` tokens (a prefill continued on a cache):
        the model's own attention over dense tensors is faster for many queries.
        """
        if self.holding:
            return self._hold(key_states, value_states)
        if not self.is_initialized or self.sink_len < self.config.sinks or key_states.shape[2] > FUSED_MAX_NEW_TOKENS:
            return self._store(key_states, value_states)
        self._check_input(key_states, value_states)
        # Here the sinks are full, so the exact tokens are the first `held` of `exact_*`, sinks then residual.
        past = self.sink_len + self.residual_len
        packed_keys = self.packed_keys.view() if self.packed_keys is not None and self.packed_length else None
        packed_values = self.packed_values.view() if self.packed_values is not None and self.packed_length else None
        if not flushed_tokens(self.residual_len + key_states.shape[2], self.config):
            # No block leaves the residual: the new tokens land right after it, and a view reads them all.
            self._append(key_states, value_states)
            held = self.sink_len + self.residual_len
            exact_keys, exact_values = self.exact_keys.narrow(2, 0, held), self.exact_values.narrow(2, 0, held)
        else:
            exact_keys = torch.cat([self.exact_keys[:, :, :past], key_states], dim=2)
            exact_values = torch.cat([self.exact_values[:, :, :past], value_states], dim=2)
            self._append(key_states, value_states)
        inputs = AttentionInputs(
            exact_keys, exact_values, packed_keys, packed_values, self.sink_len, backend, self.attention_memo
        )
        keys = key_states.view_as(key_states)  # a new tensor object: the caller's own stays unmarked
        setattr(keys, INPUTS_ATTRIBUTE, inputs)
        return keys, value_states

    def state(self) -> LayerState:
        """The layer's state (views of the valid tokens, no copy); see `LayerState`. The layer must hold tokens."""
        if not self.is_initialized:
            raise UnsupportedOperationError(f"layer {self.layer_idx} holds no tokens yet: there is no state to take.")
        assert self.packed_keys is not None and self.packed_values is not None
        packed = self.packed_length > 0
        return LayerState(
            seen_tokens=self.seen_tokens,
            sink_keys=self.sink_keys[:, :, : self.sink_len],
            sink_values=self.sink_values[:, :, : self.sink_len],
            residual_keys=self.residual_keys[:, :, : self.residual_len],
            residual_values=self.residual_values[:, :, : self.residual_len],
            packed_keys=self.packed_keys.view() if packed else None,
            packed_values=self.packed_values.view() if packed else None,
            shadow_keys=self.shadow_keys[:, :, : self.shadow_len],
            shadow_values=self.shadow_values[:, :, : self.shadow_len],
            record_past=self.record_past,
        )

    def restore(self, state: LayerState) -> None:
        """Make this (empty) layer hold `state`, as if it had received the tokens itself.

        Buffers are allocated as a first update allocates them (on the device and in the dtype of the state's
        tensors) and the state's tensors are copied in, so later updates behave exactly as they would have on
        the layer the state was taken from. The layer owns copies of everything (nothing is shared with `state`).
        The caller checks the state's consistency (`kvpack.cache.persist`
        does, for saved files); shapes that do not fit raise `ShapeError`.
        """
        if self.is_initialized:
            raise UnsupportedOperationError(
                f"layer {self.layer_idx} already holds tokens; restore a state into a new cache (or cache.reset())."
            )
        self.record_past = state.record_past
        self.lazy_initialization(state.residual_keys, state.residual_values)
        try:
            self.sink_len = state.sink_keys.shape[2]
            self.residual_len = state.residual_keys.shape[2]
            self.shadow_len = state.shadow_keys.shape[2]
            self._reserve_exact(self._exact_tokens(self.sink_len, self.residual_len))
            self.sink_keys[:, :, : self.sink_len] = state.sink_keys
            self.sink_values[:, :, : self.sink_len] = state.sink_values
            self.residual_keys[:, :, : self.residual_len] = state.residual_keys
            self.residual_values[:, :, : self.residual_len] = state.residual_values
            self.shadow_keys[:, :, : self.shadow_len] = state.shadow_keys
            self.shadow_values[:, :, : self.shadow_len] = state.shadow_values
            assert self.packed_keys is not None and self.packed_values is not None
            if state.packed_keys is not None and state.packed_values is not None:
                self.packed_keys.append(_owned(state.packed_keys, self.device))
                self.packed_values.append(_owned(state.packed_values, self.device))
            self.seen_tokens = state.seen_tokens
        except RuntimeError as exc:  # a copy whose shapes do not fit the buffers
            self.reset()
            raise ShapeError(f"layer {self.layer_idx}: the state does not fit this layer's buffers: {exc}") from exc

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored keys and values `[batch, kv_heads, tokens, head_dim]` in the model dtype, oldest first."""
        keys, values = self._stored_parts()
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def _stored_parts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys = [self.sink_keys[:, :, : self.sink_len]]
        values = [self.sink_values[:, :, : self.sink_len]]
        if self.packed_length:
            assert self.packed_keys is not None and self.packed_values is not None
            keys.append(self.packed_keys.view().dequantize(self.dtype))
            values.append(self.packed_values.view().dequantize(self.dtype))
        keys.append(self.residual_keys[:, :, : self.residual_len])
        values.append(self.residual_values[:, :, : self.residual_len])
        return keys, values

    @property
    def keys(self) -> torch.Tensor | None:
        """All stored keys `[batch, kv_heads, tokens, head_dim]`, dequantized (a new tensor), None while empty.

        As transformers' `DynamicLayer.keys` reads, for code that reads a layer's keys. Assigning a prefix slice of
        the tensor read (`layer.keys = layer.keys[:, :, :n]`, as kvpress's pipeline drops an answer) crops the
        layer to `n` tokens (see `crop`); any other assignment raises `UnsupportedOperationError`: packed tokens
        are written once, from the model's own keys.
        """
        return self._read_dense("keys")

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._assign("keys", tensor)

    @property
    def values(self) -> torch.Tensor | None:
        """All stored values, dequantized; see `keys`."""
        return self._read_dense("values")

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._assign("values", tensor)

    def _read_dense(self, name: str) -> torch.Tensor | None:
        if self.holding and self.held_keys is not None and self.held_values is not None:
            return self.held_keys if name == "keys" else self.held_values
        if not self.is_initialized:
            return None
        keys, values = self.dense()
        tensor = keys if name == "keys" else values
        self._handed_out[name] = weakref.ref(tensor)
        return tensor

    def _assign(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None and not getattr(self, "is_initialized", False) and not getattr(self, "holding", False):
            return  # transformers' layer base class starts every layer with `keys = values = None`
        handed = self._handed_out.get(name)
        source = handed() if handed is not None else None
        base = tensor._base if tensor is not None and tensor._base is not None else tensor
        if (
            tensor is None
            or source is None
            or base is not source
            or tensor.data_ptr() != source.data_ptr()
            or tensor.shape[2] > self.seen_tokens
            or tensor.shape[:2] != source.shape[:2]
        ):
            raise UnsupportedOperationError(
                f"layer {self.layer_idx}: kvpack's packed layers do not take new {name} by assignment (packed tokens "
                "are quantized once, from the model's own keys and values); only a prefix slice of the tensor "
                f"read from `layer.{name}` may be assigned, to crop. To prune a prefill with a kvpress press, "
                "wrap it: kvpack.press.PackAfterPress(press)."
            )
        del self._handed_out[name]
        self.crop(tensor.shape[2])

    def stored_tokens(self) -> int:
        """Tokens physically held (sinks + packed + residual)."""
        return self.sink_len + self.packed_length + self.residual_len

    def nbytes(self) -> int:
        """Exact bytes held by this layer, preallocated capacity included (a held prefill: its tensors)."""
        if self.held_keys is not None and self.held_values is not None:
            return sum(t.numel() * t.element_size() for t in (self.held_keys, self.held_values))
        if not self.is_initialized:
            return 0
        assert self.packed_keys is not None and self.packed_values is not None
        dense = (
            self.exact_keys,  # the sinks and the residual window
            self.exact_values,
            self.shadow_keys,
            self.shadow_values,
        )
        return (
            sum(t.numel() * t.element_size() for t in dense) + self.packed_keys.nbytes() + self.packed_values.nbytes()
        )

    def fp16_nbytes(self) -> int:
        """Bytes a float16 `DynamicCache` layer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads = self.residual_keys.shape[:2]
        dims = self.residual_keys.shape[-1] + self.residual_values.shape[-1]
        return batch * heads * self._dynamic_cache_tokens() * dims * 2

    def _dynamic_cache_tokens(self) -> int:
        return self.seen_tokens

    def _check_input(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t, ref in (("keys", key_states, self.residual_keys), ("values", value_states, self.residual_values)):
            if t.dtype != self.dtype or t.device != self.device:
                raise DtypeDeviceError(
                    f"layer {self.layer_idx}: new {name} are {t.dtype} on {t.device}, but this cache holds "
                    f"{self.dtype} on {self.device}; keep the model's dtype/device fixed, or call cache.reset()."
                )
            if t.dim() != 4 or t.shape[0] != ref.shape[0] or t.shape[1] != ref.shape[1] or t.shape[3] != ref.shape[3]:
                raise ShapeError(
                    f"layer {self.layer_idx}: new {name} have shape {tuple(t.shape)}, but this cache holds "
                    f"[batch={ref.shape[0]}, heads={ref.shape[1]}, tokens, head_dim={ref.shape[3]}]; use a new cache "
                    "(or cache.reset()) for a different batch or model."
                )
        if key_states.shape[2] != value_states.shape[2]:
            raise ShapeError(
                f"layer {self.layer_idx}: {key_states.shape[2]} new keys but {value_states.shape[2]} values."
            )

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.exact_keys, self.exact_values = fn(self.exact_keys), fn(self.exact_values)
        self._split_exact()
        self.shadow_keys, self.shadow_values = fn(self.shadow_keys), fn(self.shadow_values)
        assert self.packed_keys is not None and self.packed_values is not None
        self.packed_keys.map_batch(fn)
        self.packed_values.map_batch(fn)


class PackedSlidingLayer(PackedLayer):
    """The cache of a sliding-window layer (e.g. Gemma 3's local layers).

    Behaves like transformers' `DynamicSlidingWindowLayer`: attention sees at most the last
    `sliding_window - 1` past tokens plus the new ones, and the mask sizes are the same. Packed blocks
    wholly older than that window (plus a margin that keeps `crop` of the residual window exact) are
    dropped. Sinks are not used: the window moves past them.
    """

    is_sliding = True

    def __init__(self, config: CacheConfig, sliding_window: int, layer_idx: int = 0):
        super().__init__(replace(config, sinks=0), layer_idx)
        self.sliding_window = sliding_window

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        visible = min(self.seen_tokens, self.sliding_window - 1) + key_states.shape[2]
        keys, values = self._store(key_states, value_states)
        self._forget_outside_window()
        return keys[:, :, -visible:], values[:, :, -visible:]

    def fused_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window layers attend through the reference path (dense tensors) for now."""
        return self.update(key_states, value_states)

    def _forget_outside_window(self) -> None:
        drop = dropped_tokens(self.stored_tokens(), self.packed_length, self.sliding_window, self.config)
        if drop:
            assert self.packed_keys is not None and self.packed_values is not None
            self.packed_keys.drop_oldest(drop)
            self.packed_values.drop_oldest(drop)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.seen_tokens - self.sliding_window + 1, 0)
        if self.seen_tokens >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.seen_tokens + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise UnsupportedOperationError(
                "crop: a sliding-window layer can only be cropped by a negative count of tokens to remove."
            )
        super().crop(tokens_to_remove)

    def _dynamic_cache_tokens(self) -> int:
        return min(self.seen_tokens, self.sliding_window - 1)


def _owned(packed: PackedTensor, device: torch.device) -> PackedTensor:
    """A copy of `packed` on `device` that shares no storage with it (a first append keeps its tensors)."""
    return packed.map_parts(lambda t: t.to(device, copy=True, memory_format=torch.contiguous_format))
