"""`auto-<bits>` specs: options and per-layer bits chosen per model on the calibration text (`calibrate_auto`), kept in
the profile store keyed by the model, accepted by `KVPackCache`, the pipeline and the harness."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel

from kvpack import ConfigError, KVPackCache, cli, parse_spec
from kvpack.bench.synthetic import biased_key_model
from kvpack.cache import auto
from kvpack.calibrate import AUTO_BASES, calibrate_auto, emulated_kl, emulated_quality, fisher_sensitivity
from kvpack.compat import cache_kwargs
from kvpack.harness.caches import make_cache, parse_cache_name, resolve_auto
from kvpack.profile import load_profile, resolve_config
from kvpack.texts import calibration_data_path, load_tokens
from tests.helpers.models import VOCAB, default_tokenizer, llama_config, prompt, tiny_gemma, tiny_llama

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOKENS = 320  # past the residual window (128), the 4 sinks and two blocks of 64: most of the cache is packed


@pytest.fixture(autouse=True)
def profile_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "store"
    monkeypatch.setenv("KVPACK_PROFILE_DIR", str(store))
    return store


def sharp_llama(vocab_size: int = VOCAB, seed: int = 0, layers: int = 2) -> PreTrainedModel:
    """A tiny random Llama with head_dim 64 (the default groups fit) and output weights scaled up so that its
    next-token distributions are as sharp as a trained model's (see test_calibrate)."""
    torch.manual_seed(seed)
    config = llama_config(vocab_size=vocab_size, head_dim=64, max_position_embeddings=1024, num_hidden_layers=layers)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def tokenizer(text: str, return_tensors: str = "pt") -> SimpleNamespace:
    """Stands in for a tokenizer of the tiny models: the same 600 random ids for any text (more than the default
    512 calibration tokens)."""
    return SimpleNamespace(input_ids=prompt(tokens=600, seed=5))


def test_auto_budget_reads_only_auto_specs() -> None:
    assert auto.auto_budget("auto-4.5") == 4.5
    assert auto.auto_budget(" AUTO-3 ") == 3.0
    for other in ("k4v4", "auto", "auto-", "auto-x", "auto-4.5-rot", None, 4.5):
        assert auto.auto_budget(other) is None


@pytest.mark.parametrize("budget", [4.5, 3.5, 2.5])
def test_auto_is_never_worse_than_a_fixed_spec_of_its_width_on_the_calibration_text(budget: float) -> None:
    model = sharp_llama()
    profile = calibrate_auto(model, tokenizer, budget, tokens=TOKENS, progress=False)
    assert profile.average_bits <= budget and profile.budget_bits == budget
    assert profile.config.layer_bits and len(profile.config.layer_bits) == 2
    kinds = {choice["kind"] for choice in profile.choices}
    assert kinds == {"per layer", "uniform"}
    uniform_widths = {round(c["average_bits"], 9) for c in profile.choices if c["kind"] == "uniform"}
    assert uniform_widths == {budget}  # the fixed specs of this width (k4v4; k3v3/k4v2/k2v4; k2v2), all options
    assert len(profile.choices) >= 8
    best = min(choice["kl"] for choice in profile.choices)
    ids, _ = load_tokens(calibration_data_path(), tokenizer, TOKENS)
    # The recorded KL is the measurement of the profile's own config, and the lowest of all candidates.
    assert emulated_kl(model, ids, [profile.config], progress=False) == [pytest.approx(best, rel=1e-9)]
    for spec in ("k4v4", "k4v4-plain-s4", "k4v4-rotk") if budget == 4.5 else ():
        fixed = emulated_kl(model, ids, [parse_spec(spec)], progress=False)[0]
        assert best <= fixed, spec


@pytest.mark.parametrize("budget", [2.5, 2.4, 3.5])
def test_a_budget_the_smallest_codes_fill_also_considers_longer_key_groups(budget: float) -> None:
    """At 2.5 bits every layer at 2 bits in groups of 64 fills the budget: no allocation could differ from `k2v2`. The
    option sets are then also tried with key groups of 128 tokens, whose metadata costs less, leaving bits to spend
    per layer (and reaching budgets below 2.5); where the budget leaves room, nothing is added. (8 layers: one layer's
    key at 3 bits costs 1/16 bit per value, within the 1/8 that the longer groups free.)"""
    model = sharp_llama(layers=8)
    profile = calibrate_auto(model, tokenizer, budget, tokens=TOKENS, progress=False)
    longer = [c for c in profile.choices if parse_spec(c["spec"]).key.group_size == 128]
    if budget == 3.5:
        assert not longer
        return
    bases = {c["base"] for c in longer}
    assert bases == {parse_spec(f"{base}-gk128").spec for base in AUTO_BASES}
    allocations = [c for c in longer if c["kind"] == "per layer"]
    assert allocations and all(c["average_bits"] <= budget for c in allocations)
    spent = any(len(set(parse_spec(c["spec"]).layer_bits)) > 1 for c in allocations)
    assert spent == (budget == 2.5)  # 2.375 bits of groups of 128 leave 1/8 bit at 2.5, too little at 2.4
    assert profile.average_bits <= budget


def test_auto_keeps_keys_unrotated_where_rotating_them_costs() -> None:
    """On the biased-key stand-in (tests/test_default_spec.py), rotating keys costs: auto must not choose it."""
    model = biased_key_model(VOCAB)
    profile = calibrate_auto(model, tokenizer, 4.5, tokens=TOKENS, progress=False)
    assert profile.config.key.rotation == "none", profile.config.spec
    by_base = {(c["base"], c["kind"]): c["kl"] for c in profile.choices}
    rotated = by_base[(parse_spec("k4v4-rot").spec, "uniform")]
    assert min(by_base.values()) < rotated


def test_a_sliding_window_model_is_calibrated_with_its_windows() -> None:
    """Sliding-window layers are emulated as `PackedSlidingLayer` stores them (no sinks): the emulated KL of a whole
    cache is the KL of streaming the tokens one at a time through a real `KVPackCache`."""
    model = tiny_gemma()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    ids = prompt(tokens=90, seed=3)
    for spec in ("k2v2-plain-g16-r16-s2", "k3v2-g16-r8-s3-rot"):
        config = parse_spec(spec)
        emulated = emulated_kl(model, ids, [config], progress=False)[0]
        quality = emulated_quality(model, ids, [config], progress=False)[0]
        logprobs = []
        for cache in (DynamicCache(config=model.config), KVPackCache(model, config)):
            with torch.no_grad():
                rows = [
                    model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits[0, -1]
                    for t in range(ids.shape[1] - 1)
                ]
            logprobs.append(torch.log_softmax(torch.stack(rows).double(), dim=-1))
        ref, got = logprobs
        streamed = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert streamed > 0
        # Same stored data, same queries; float32 summation order differs (as in test_calibrate, rotation included).
        assert emulated == pytest.approx(streamed, rel=1e-3), spec
        assert quality.kl == emulated
        targets = ids[0, 1:]
        for logp, ppl in ((ref, quality.reference_ppl), (got, quality.ppl)):
            assert ppl == pytest.approx(math.exp(-float(logp.gather(1, targets[:, None]).mean())), rel=1e-4), spec
        assert quality.delta_ppl_pct == pytest.approx(100 * (quality.ppl / quality.reference_ppl - 1))
    key_kl, value_kl = fisher_sensitivity(model, ids, parse_spec("k4v4-plain-g16-r16-s2"), (2, 4), progress=False)
    # Layer 0's window (8 tokens) lies within the exact residual window (16): nothing it reads is ever packed.
    assert key_kl[0] == value_kl[0] == [0.0, 0.0]
    assert key_kl[1][0] >= key_kl[1][1] > 0 and value_kl[1][0] >= value_kl[1][1] > 0


def test_kvpack_cache_calibrates_once_per_model_and_budget(
    profile_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []

    def counted(model: Any, tok: Any, budget: float, **kwargs: Any) -> Any:
        calls.append(budget)
        return calibrate_auto(model, tok, budget, tokens=TOKENS, **kwargs)

    monkeypatch.setattr(auto, "calibrate_auto", counted)
    model = sharp_llama()
    first = KVPackCache(model, "auto-4.5", tokenizer=tokenizer)
    assert calls == [4.5] and first.cache_config.layer_bits
    stored = list(profile_store.iterdir())
    assert len(stored) == 1 and stored[0].name.endswith(f"-auto-4.5-v{auto.AUTO_VERSION}.json")
    assert load_profile(stored[0]).config == first.cache_config
    assert KVPackCache(model, "auto-4.5").cache_config == first.cache_config  # read back: no tokenizer needed
    assert calls == [4.5]
    KVPackCache(model, "auto-3.5", tokenizer=tokenizer)
    assert calls == [4.5, 3.5]
    with torch.no_grad():  # other weights: another model, calibrated anew
        model.model.layers[0].self_attn.k_proj.weight.mul_(2)
    KVPackCache(model, "auto-4.5", tokenizer=tokenizer)
    assert calls == [4.5, 3.5, 4.5] and len(list(profile_store.iterdir())) == 3


def test_auto_without_a_model_or_tokenizer_is_a_clear_error() -> None:
    model = sharp_llama()
    with pytest.raises(ConfigError, match="pass the model, not its config"):
        KVPackCache(model.config, "auto-4.5")
    with pytest.raises(ConfigError, match="has no model to calibrate"):
        resolve_config("auto-4.5")
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):  # a random model has no folder
        KVPackCache(model, "auto-4.5")
    with pytest.raises(ConfigError, match="no option fits 2 bits per value"):
        calibrate_auto(model, tokenizer, 2.0, tokens=TOKENS, progress=False)
    tiny = tiny_llama()  # head_dim 16: the default value groups (64 channels) do not fit any option
    with pytest.raises(ConfigError, match="no option fits"):
        calibrate_auto(tiny, tokenizer, 4.5, tokens=TOKENS, progress=False)


def test_the_tokenizer_is_found_in_the_models_folder_and_the_cli_takes_auto(
    tmp_path: Path, profile_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = default_tokenizer()
    folder = tmp_path / "model"
    sharp_llama(len(real)).save_pretrained(folder)
    real.save_pretrained(folder)
    loaded = LlamaForCausalLM.from_pretrained(folder).eval()
    cache = KVPackCache(loaded, "auto-4.5")  # no tokenizer given: read from the model's folder
    assert cache.cache_config.layer_bits and len(list(profile_store.iterdir())) == 1
    gen = ["generate", "--model", str(folder), "--cache", "auto-4.5", "--max-new-tokens", "3", "--threads", "1"]
    assert cli.main([*gen, "Hello"]) == 0  # the stored profile: no second calibration
    assert cache.cache_config.spec in capsys.readouterr().out and len(list(profile_store.iterdir())) == 1
    out = tmp_path / "auto.json"
    argv = ["calibrate", "--model", str(folder), "--budget-bits", "2.5", "--base", "auto", "--tokens", str(TOKENS)]
    assert cli.main([*argv, "--threads", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured whole on the calibration text (lowest KL chosen)" in printed and "| k*v*-plain" in printed
    profile = load_profile(out)
    assert profile.choices and profile.average_bits <= 2.5 and profile.tokens == TOKENS
    assert min(c["kl"] for c in profile.choices) == next(
        c["kl"] for c in profile.choices if c["base"] == profile.base and c["average_bits"] == profile.average_bits
    )


def test_the_harness_resolves_auto_specs_once_the_model_is_loaded() -> None:
    spec = parse_cache_name("auto-4.5@torch")
    assert (spec.name, spec.kind, spec.backend, spec.auto, spec.profile) == (
        "auto-4.5@torch",
        "kvpack",
        "torch",
        4.5,
        None,
    )
    model = sharp_llama()
    with pytest.raises(ConfigError, match="pass the model, not its config"):
        make_cache(spec, model.config)
    resolve_auto([spec, parse_cache_name("k4v4")], model, tokenizer)
    assert spec.profile is not None and Path(spec.profile).is_file()
    cache = make_cache(spec, model.config)
    assert cache.backend == "torch" and cache.cache_config == load_profile(spec.profile).config
    assert spec.bits_per_value() == load_profile(spec.profile).average_bits
    with pytest.raises(ConfigError, match="attention backend 'nope'"):
        parse_cache_name("auto-4.5@nope")


def test_the_decode_bench_refuses_auto_on_a_random_weight_shape() -> None:
    from kvpack.bench.decode import run_decode

    with pytest.raises(ConfigError, match="not on a random-weight --model-shape"):
        run_decode(["fp", "auto-4.5"], [1024], model_shape="llama-3.2-1b")


def test_the_profiles_command_lists_the_store_and_deletes_stale_profiles(
    profile_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    KVPackCache(sharp_llama(), "auto-4.5", tokenizer=tokenizer)
    (current,) = profile_store.iterdir()
    stale = current.with_name(current.name.replace(f"-v{auto.AUTO_VERSION}.json", "-v1.json"))
    stale.write_bytes(current.read_bytes())
    broken = current.with_name(current.name.replace("-auto-4.5-", "-auto-3.5-"))
    broken.write_text("{not json")
    (profile_store / "notes.json").write_text("{}")  # not a stored profile's name: never listed nor deleted
    assert cli.main(["profiles"]) == 0
    listed = capsys.readouterr().out
    assert "3 stored profiles" in listed and "| current |" in listed and "unreadable" in listed
    assert f"stale (v1, now v{auto.AUTO_VERSION})" in listed and "| 4.5 |" in listed
    assert cli.main(["profiles", "--clear-stale"]) == 0
    assert sorted(p.name for p in profile_store.iterdir()) == sorted([current.name, "notes.json"])
    assert cli.main(["profiles", "--clear"]) == 0
    assert [p.name for p in profile_store.iterdir()] == ["notes.json"]
    assert cli.main(["profiles"]) == 0 and "no stored profiles" in capsys.readouterr().out
