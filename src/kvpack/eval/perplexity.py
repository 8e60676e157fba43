"""Streamed perplexity and agreement with the full-precision cache.

Every token is fed on its own (after an optional first chunk), so every prediction attends to the cache
under test as it stands: a quantized past, not a full-precision prefill. The reference run (the model's
own DynamicCache) keeps its next-token log-probabilities, and every other cache is compared with them in
the same pass: KL(reference || cache) per position, and whether the top-1 tokens agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from kvpack.compat import cache_kwargs
from kvpack.harness.caches import CacheSpec, cache_nbytes, make_cache


@dataclass
class StreamResult:
    """Per-position results of one streamed run over `n` tokens (`n - 1` predictions)."""

    name: str
    nll: torch.Tensor  # [n - 1] negative log-likelihood of each next token
    kl: torch.Tensor | None  # [n - 1] KL(reference || this cache), None for the reference itself
    top1_agree: torch.Tensor | None  # [n - 1] bool
    seconds: float
    cache_bytes: int
    notes: list[str]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.double().mean().item())

    def summary(self, reference: StreamResult | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "cache": self.name,
            "ppl": self.perplexity,
            "predictions": int(self.nll.numel()),
            "seconds": self.seconds,
            "cache_bytes_at_end": self.cache_bytes,
            "notes": self.notes,
        }
        if reference is not None:
            row["delta_ppl_pct"] = 100 * (self.perplexity / reference.perplexity - 1)
        if self.kl is not None and self.top1_agree is not None:
            row.update(
                mean_kl=self.kl.double().mean().item(),
                max_kl=self.kl.max().item(),
                worst_position=int(self.kl.argmax().item()) + 1,
                top1_agreement=self.top1_agree.double().mean().item(),
            )
        return row


def stream(
    model: Any,
    ids: torch.Tensor,
    spec: CacheSpec,
    reference_logprobs: torch.Tensor | None = None,
    keep_logprobs: bool = False,
    progress: bool = True,
    label: str | None = None,
) -> tuple[StreamResult, torch.Tensor | None]:
    """Feed `ids` `[1, n]` through `model` one token at a time with a fresh cache of kind `spec`.

    Returns the result and, with `keep_logprobs`, the float32 log-probabilities `[n - 1, vocab]` (the
    reference for later runs). With `reference_logprobs`, KL and top-1 agreement are computed on the fly.
    label: the result's name (default: the spec's).
    """
    name = label or spec.name
    cache = make_cache(spec, model.config)
    ids = ids.to(model.device)
    n = ids.shape[1]
    first = spec.feed_first_tokens_together
    nll = torch.empty(n - 1)
    kl = torch.empty(n - 1) if reference_logprobs is not None else None
    agree = torch.empty(n - 1, dtype=torch.bool) if reference_logprobs is not None else None
    kept = None
    positions = [(0, first)] + [(t, t + 1) for t in range(first, n - 1)]
    start_time = time.perf_counter()
    with torch.no_grad():  # not inference_mode: quanto's quantized weights fail on inference tensors
        for start, end in tqdm(positions, desc=name, disable=not progress, leave=False):
            logits = model(ids[:, start:end], **cache_kwargs(model, cache), use_cache=True).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            targets = ids[0, start + 1 : end + 1].cpu()
            rows = slice(start, end)
            nll[rows] = -logprobs.gather(-1, targets[:, None])[:, 0]
            if keep_logprobs:
                if kept is None:
                    kept = torch.empty(n - 1, logprobs.shape[-1])
                kept[rows] = logprobs
            if reference_logprobs is not None:
                assert kl is not None and agree is not None
                ref = reference_logprobs[rows]
                kl[rows] = (ref.exp() * (ref - logprobs)).sum(-1)
                agree[rows] = ref.argmax(-1) == logprobs.argmax(-1)
    seconds = time.perf_counter() - start_time
    result = StreamResult(
        name=name,
        nll=nll,
        kl=kl,
        top1_agree=agree,
        seconds=seconds,
        cache_bytes=cache_nbytes(cache),
        notes=list(spec.notes),
    )
    return result, kept
