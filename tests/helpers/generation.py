"""Running a model over a cache as transformers does: generation, decode steps (dense or fused attention), teacher
forcing, and the greedy comparison that allows only near-tie divergence."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from kvpack.attention import use_kvpack_attention
from kvpack.compat import cache_kwargs
from tests.quant.tolerances import LOGIT_TOL_8BIT


def generate(model: PreTrainedModel, cache: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """`model.generate` with `cache` (greedy, 30 new tokens, pad id 0 unless `kwargs` say otherwise)."""
    kwargs.setdefault("max_new_tokens", 30)
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids, **cache_kwargs(model, cache), pad_token_id=0, **kwargs)


def set_attention(model: PreTrainedModel, fused: bool) -> None:
    """kvpack's attention (reads the packed cache) when `fused`, else the model's SDPA on dequantized tensors."""
    if fused:
        use_kvpack_attention(model)
    else:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def step_logits(model: PreTrainedModel, cache: Any, ids: torch.Tensor, prefill: int, fused: bool) -> torch.Tensor:
    """Last-position logits `[batch, steps, vocab]` of a prefill of `prefill` tokens, then chunks of 1-3 tokens (the
    decode and candidate-verification shapes), with attention fused or not (`set_attention`)."""
    set_attention(model, fused)
    logits = [model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1]]
    for i in range(prefill, ids.shape[1], 3):
        step = ids[:, i : i + 1 + (i // 3) % 3]
        logits.append(model(step, **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, dim=1)


@torch.no_grad()
def teacher_forced_logits(model: PreTrainedModel, cache: Any, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Next-token logits `[batch, steps, vocab]`: one prefill, then one token per forward, as in decoding."""
    logits = [model(ids[:, :prefill], **cache_kwargs(model, cache)).logits[:, -1]]
    for i in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, i : i + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, dim=1)


@torch.no_grad()
def continue_steps(model: PreTrainedModel, cache: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Feed `ids` in chunks of 1-3 tokens (decode and candidate-verification shapes); the logits of each chunk."""
    logits, i = [], 0
    while i < ids.shape[1]:
        size = 1 + (i // 2) % 3
        logits.append(model(ids[:, i : i + size], **cache_kwargs(model, cache)).logits)
        i += size
    return logits


def assert_same_greedy(reference: Any, packed: Any, prompt_len: int, tol: float = LOGIT_TOL_8BIT) -> None:
    """Greedy outputs (`return_dict_in_generate`, `output_logits`) agree, allowing only near-tie divergence.

    Per row: tokens equal and logits within `tol` up to the first differing token; at that step the reference's
    top-2 margin must be within 2 * tol (so the cache's error alone can explain the other choice). Random-weight
    models have flat next-token distributions, where two top logits can be closer than a cache's error.
    """
    ref_logits, got_logits = torch.stack(reference.logits, dim=1), torch.stack(packed.logits, dim=1)
    ref_new, got_new = reference.sequences[:, prompt_len:], packed.sequences[:, prompt_len:]
    assert ref_new.shape == got_new.shape
    for row in range(ref_new.shape[0]):
        differ = (ref_new[row] != got_new[row]).nonzero()
        agree = int(differ[0]) if len(differ) else ref_new.shape[1]
        steps = min(agree + 1, ref_new.shape[1])  # logits of the diverging step still come from one prefix
        err = (ref_logits[row, :steps] - got_logits[row, :steps]).abs().max().item()
        assert err <= tol, f"row {row}: logits differ by {err:.2e} > {tol:.0e}"
        if agree < ref_new.shape[1]:
            top2 = ref_logits[row, agree].topk(2).values
            margin = (top2[0] - top2[1]).item()
            assert margin <= 2 * tol, f"row {row}: token {agree} differs, yet the top-2 margin is {margin:.2e}"
