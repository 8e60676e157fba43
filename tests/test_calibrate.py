"""`kvpack calibrate`: the emulated cache against a real one, the sensitivity, the allocation, profiles and the CLI."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel

from kvpack import ConfigError, KVPackCache, ShapeError, cli, parse_spec
from kvpack.cache.layer import PackedLayer
from kvpack.calibrate import (
    SensitivityMeter,
    allocate,
    emulate_stored,
    fisher_record,
    fisher_sensitivity,
    fisher_table,
    measure_sensitivity,
    quantized_mask,
)
from kvpack.compat import cache_kwargs
from kvpack.profile import PROFILE_SCHEMA_VERSION, Profile, ProfileModel, load_profile, resolve_config
from tests.helpers.models import llama_config, prompt, tiny_llama

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BASE = "k4v4-plain-g16-r16-s2"
EMULATED = [
    "k4v4-plain-g16-r16-s2",
    "k3v2-plain-g16-r0",
    "k2v4-plain-gk32-gv16-r20-s3",
    "k4v3-plain-g16-r5-kt",
    "k2v2-plain-g16-r16-s2-rot",
]


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    """A tiny random Llama whose output weights are scaled up 30x: a random model's next-token distributions are
    nearly flat (logits span ~0.8), which puts a 2-bit cache's KL (~1e-5) near float32's rounding of log-softmax;
    sharper ones (logits span ~25, as a trained model's) give KLs of ~1e-3 that the comparisons below resolve."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


# -- the emulated cache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", EMULATED)
def test_emulation_holds_what_a_streamed_layer_holds(spec: str) -> None:
    """Row t of the mask is what a `PackedLayer` fed one token at a time holds packed when token t arrives, and
    the emulated tensors are the layer's stored ones (bit for bit without rotation)."""
    config = parse_spec(spec)
    tokens = 150
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, tokens, 16, generator=gen) * 3
    values = torch.randn(1, 2, tokens, 16, generator=gen)
    mask = quantized_mask(tokens, config)
    layer = PackedLayer(config)
    for t in range(tokens):
        row = mask[t].nonzero().flatten().tolist()
        packed = layer.packed_length
        assert row == list(range(layer.sink_len, layer.sink_len + packed)), t
        layer.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    # The last query (token tokens-1) reads what the layer held after tokens-1 tokens: compare with a fresh layer.
    before_last = PackedLayer(config)
    before_last.append(keys[:, :, :-1], values[:, :, :-1])
    stored_keys, stored_values = before_last.dense()
    assert before_last.packed_length > 0
    for stored, x, part in ((stored_keys, keys, config.key), (stored_values, values, config.value)):
        emulated = emulate_stored(x, part, config)[:, :, : tokens - 1]
        if config.key.rotation == "none":
            assert torch.equal(emulated, stored)
        else:  # x @ R over another number of rows may round differently in the last bit, and move a code
            torch.testing.assert_close(emulated, stored, rtol=0, atol=0.02 * float(x.abs().max()))


def streamed_kl(model: PreTrainedModel, ids: torch.Tensor, config: str, layer: int) -> float:
    """Mean KL(exact || cache) streaming `ids` one token at a time, with only `layer` of the cache packed."""
    logprobs = []
    for cache in (DynamicCache(config=model.config), KVPackCache(model, config)):
        if isinstance(cache, KVPackCache):
            for idx in range(len(cache.layers)):
                if idx != layer:
                    cache.layers[idx] = DynamicCache(config=model.config).layers[idx]
        with torch.no_grad():
            rows = [
                model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits[0, -1] for t in range(ids.shape[1] - 1)
            ]
        logprobs.append(torch.log_softmax(torch.stack(rows).float(), dim=-1))
    ref, got = logprobs
    return float((ref.exp() * (ref - got)).sum(-1).mean())


@pytest.mark.parametrize(
    ("spec", "layer"), [("k2v2-plain-g16-r16-s2", 0), ("k3v2-plain-g16-r5-rot", 1), ("k2v3-plain-g16-r0", 1)]
)
def test_emulated_kl_is_the_streamed_caches_kl(llama: PreTrainedModel, spec: str, layer: int) -> None:
    ids = prompt(tokens=120, seed=2)
    meter = SensitivityMeter(llama, ids, parse_spec(spec))
    emulated = meter.kl(layer, ("key", "value"), parse_spec(spec))
    streamed = streamed_kl(llama, ids, spec, layer)
    assert streamed > 0
    # Same stored data, same queries: only float32 summation order differs (measured relative gaps <= 2.1e-6).
    assert emulated == pytest.approx(streamed, rel=1e-4)


def test_sensitivity_is_zero_with_nothing_packed_and_falls_with_bits(llama: PreTrainedModel) -> None:
    ids = prompt(tokens=120, seed=2)
    everything_exact = parse_spec("k2v2-plain-g16-r128")  # residual >= tokens: nothing is ever packed
    exact_meter = SensitivityMeter(llama, ids, everything_exact)
    meter = SensitivityMeter(llama, ids, parse_spec(BASE))
    for layer, tensor in itertools.product((0, 1), ("key", "value")):
        assert exact_meter.kl(layer, (tensor,), everything_exact) == 0.0
        kls = [meter.kl(layer, (tensor,), parse_spec(f"k{b}v{b}-g16-r16-s2")) for b in (2, 3, 4, 8)]
        # The meter runs only the tokens after the exact prefix; a meter whose prefix is one token gives the same.
        whole = SensitivityMeter(llama, ids, parse_spec("k4v4-plain-g16-r0-kt"))
        kt = parse_spec(
            "k2v2-plain-g16-r0-kt"
        )  # (keys per token: blocks of one token, so every query reads packed data)
        assert whole.prefix == 1 and whole.kl(layer, (tensor,), kt) > 0
        assert all(a > b > 0 for a, b in itertools.pairwise(kls)), (layer, tensor, kls)


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


@pytest.mark.parametrize("spec", ["k4v4-plain-g16-r16-s2", "k4v4-g16-r16-s2", "k4v4-plain-g16-r0-kt"])
def test_fisher_estimate_ranks_perturbations_as_the_emulated_kl_does(llama: PreTrainedModel, spec: str) -> None:
    ids = prompt(tokens=120, seed=2)
    base = parse_spec(spec)
    fisher = fisher_sensitivity(llama, ids, base, (2, 3, 4, 8), progress=False)
    emulated = measure_sensitivity(llama, ids, base, (2, 3, 4, 8), progress=False)
    estimates = [kl for table in fisher for row in table for kl in row]
    exact = [kl for table in emulated for row in table for kl in row]
    assert all(kl > 0 for kl in estimates)
    # An estimate (second order, empirical Fisher): its scale is off (2-6x here), its order is what allocation uses.
    # Measured rank correlations 0.985-0.991 on these specs (0.98 on the default model's 240 measurements).
    correlation = float(torch.corrcoef(torch.stack([_ranks(estimates), _ranks(exact)]))[0, 1])
    assert correlation > 0.95


def test_fisher_estimate_is_zero_with_nothing_packed_and_falls_with_bits(llama: PreTrainedModel) -> None:
    ids = prompt(tokens=120, seed=2)
    nothing_packed = fisher_sensitivity(llama, ids, parse_spec("k2v2-plain-g16-r128"), (2, 4), progress=False)
    assert all(kl == 0.0 for table in nothing_packed for row in table for kl in row)
    for table in fisher_sensitivity(llama, ids, parse_spec(BASE), (2, 3, 4, 8), progress=False):
        for row in table:
            assert all(a > b > 0 for a, b in itertools.pairwise(row)), row


def test_fisher_tables_sharing_measurements_equal_tables_made_alone(llama: PreTrainedModel) -> None:
    """`calibrate_auto` builds the tables of several option sets with one memo: a measurement two sets share (the same
    tensor stored the same way, the same exact window) is made once, and every table is the one made alone."""
    ids = prompt(tokens=120, seed=2)
    record = fisher_record(llama, ids)
    bases = ["k4v4-g16-r16-s2", "k4v4-plain-g16-r16-s2", "k4v4-g16-r16-s2-rot", "k4v4-g16-r16-s2-clipk",
             "k4v4-g16-r32-s2", "k4v4-gk32-gv16-r16-s2"]  # fmt: skip
    memo: dict[object, object] = {}
    for base in bases:
        alone = fisher_table(record, parse_spec(base), (2, 4), progress=False)
        assert fisher_table(record, parse_spec(base), (2, 4), progress=False, memo=memo) == alone, base
    layers = len(record.inputs)
    # Keys stored 5 ways (the first two bases store them alike; rotated, clipped, a wider window, 32-token groups) and
    # values 4 ways (rotated in the first, third and fourth; plain; the wider window; the 32-token blocks), 2 widths;
    # the exact outputs once per window (r16 with 16-token blocks, r32, 32-token blocks).
    assert sum(1 for key in memo if key[0] == "perturbed") == (5 + 4) * 2 * layers
    assert sum(1 for key in memo if key[0] == "exact") == 3 * layers


# -- allocation ------------------------------------------------------------------------------------------------------


def brute_force(key_kl, value_kl, bits, base, budget) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    layers = len(key_kl)
    for choice in itertools.product(range(len(bits)), repeat=2 * layers):
        pairs = tuple((bits[choice[2 * i]], bits[choice[2 * i + 1]]) for i in range(layers))
        if replace(base, layer_bits=pairs).bits_per_value <= budget:
            kl = sum(key_kl[i][choice[2 * i]] + value_kl[i][choice[2 * i + 1]] for i in range(layers))
            best = min(best, kl)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_brute_force_optimum_within_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    bits = (2, 3, 4, 8)
    base = parse_spec(["k4v4-plain", "k4v4-plain-g32", "k4v4-plain-gk128-gv16"][seed % 3])
    # Damage falls with bits, as measured tables do, but by layer- and tensor-specific factors.
    key_kl = [sorted((rng.uniform(0, 1) ** 3 for _ in bits), reverse=True) for _ in range(3)]
    value_kl = [sorted((rng.uniform(0, 1) ** 3 for _ in bits), reverse=True) for _ in range(3)]
    floor = replace(base, layer_bits=((2, 2),) * 3).bits_per_value
    for budget in (floor, floor + 0.25, floor + 0.5, floor + 1, floor + 1.7, floor + 3, floor + 6):
        result = allocate(key_kl, value_kl, bits, base, budget)
        achieved = replace(base, layer_bits=result.layer_bits).bits_per_value
        assert achieved == result.average_bits <= budget
        chosen = sum(
            key_kl[i][bits.index(k)] + value_kl[i][bits.index(v)] for i, (k, v) in enumerate(result.layer_bits)
        )
        assert result.total_kl == pytest.approx(chosen, abs=1e-12)
        assert result.total_kl == pytest.approx(brute_force(key_kl, value_kl, bits, base, budget), abs=1e-12)


def test_allocation_spends_the_budget_where_it_helps_and_improves_with_it() -> None:
    bits = (2, 4, 8)
    base = parse_spec("k4v4-plain")  # 0.5 metadata bits per value
    # Layer 1's keys are the only tensor that suffers from 2 bits.
    key_kl = [[0.01, 0.005, 0.0], [5.0, 0.2, 0.0], [0.01, 0.005, 0.0]]
    value_kl = [[0.01, 0.005, 0.0]] * 3
    result = allocate(key_kl, value_kl, bits, base, budget_bits=2.5 + 2 / 6)  # room for one tensor at 4 bits
    assert result.layer_bits == ((2, 2), (4, 2), (2, 2))
    assert result.average_bits == pytest.approx(2.5 + 2 / 6)
    previous = float("inf")
    for budget in [2.5 + i / 12 for i in range(0, 6 * 12 + 1)]:
        result = allocate(key_kl, value_kl, bits, base, budget)
        assert result.average_bits <= budget + 1e-12 and result.total_kl <= previous
        previous = result.total_kl
    assert previous == 0.0  # everything at 8 bits
    with pytest.raises(ConfigError, match="below the smallest allocation"):
        allocate(key_kl, value_kl, bits, base, budget_bits=2.49)


def test_allocation_weights_keys_and_values_by_head_dims() -> None:
    base = parse_spec("k4v4-plain")
    # Keys of dim 3 and values of dim 1: upgrading the value costs a third of upgrading the key.
    result = allocate([[1.0, 0.0]], [[0.9, 0.0]], (2, 4), base, budget_bits=2.5 + 2 / 4, key_dim=3, value_dim=1)
    assert result.layer_bits == ((2, 4),)


# -- profiles --------------------------------------------------------------------------------------------------------


def make_profile(layers: int = 2) -> Profile:
    config = replace(parse_spec(BASE), layer_bits=((2, 4), (4, 2))[:layers] + ((4, 4),) * (layers - 2))
    return Profile(
        config=config,
        base=BASE,
        model=ProfileModel("tiny", "llama", layers, 2, 16),
        data_name="calibration.txt",
        data_sha256="0" * 64,
        tokens=100,
        budget_bits=5.0,
        average_bits=config.bits_per_value,
        candidates=(2, 4),
        key_kl=[[0.5, 0.1]] * layers,
        value_kl=[[0.3, 0.2]] * layers,
        seconds=1.5,
        kvpack_version="0.1.0",
        created="2026-01-01T00:00:00+00:00",
    )


def test_profile_round_trips_and_is_accepted_as_a_spec(llama: PreTrainedModel, tmp_path: Path) -> None:
    profile = make_profile()
    path = tmp_path / "tiny-5.json"
    profile.save(path)
    loaded = load_profile(path)
    assert loaded == profile and loaded.label == "profile:tiny-5"
    assert loaded.predicted_kl == pytest.approx(0.5 + 0.2 + 0.1 + 0.3)
    assert resolve_config(str(path)) == resolve_config(path) == profile.config
    cache = KVPackCache(llama, str(path))
    assert cache.cache_config == profile.config
    assert [layer.config.key.bits for layer in cache.layers] == [2, 4]


def rewritten(tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    data = make_profile().to_dict()
    change(data)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(schema_version=PROFILE_SCHEMA_VERSION + 1),
            "schema_version 2; this kvpack reads version 1",
        ),
        (lambda d: d.pop("format"), "is not a kvpack profile"),
        (lambda d: d.pop("layers"), "is malformed: KeyError"),
        (lambda d: d["layers"].pop(), "is inconsistent"),
        (lambda d: d["cache_config"].update(layer_bits=[[2, 5], [4, 4]]), r"bits must be among"),
        (lambda d: d["model"].update(layers=3), "is inconsistent"),
    ],
)
def test_a_bad_profile_is_a_clear_error(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        load_profile(rewritten(tmp_path, change))


def test_missing_or_non_json_profile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; make one with `kvpack calibrate"):
        resolve_config(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        resolve_config(str(tmp_path / "bad.json"))


def test_a_profile_for_another_model_is_refused(tmp_path: Path) -> None:
    make_profile(layers=3).save(tmp_path / "three.json")
    make_profile().save(tmp_path / "two.json")
    torch.manual_seed(0)
    other_heads = LlamaForCausalLM(llama_config(head_dim=32)).eval()
    with pytest.raises(ConfigError, match=r"calibrated for tiny .* layers 3 \(profile\) vs 2 \(model\)"):
        KVPackCache(other_heads, str(tmp_path / "three.json"))
    with pytest.raises(ConfigError, match=r"head_dim 16 \(profile\) vs 32 \(model\)"):
        KVPackCache(other_heads, str(tmp_path / "two.json"))
    # Without the file's fingerprint (a config only), the layer count is still checked.
    with pytest.raises(ConfigError, match="per-layer bits for 3 layers, but this model has 2"):
        KVPackCache(other_heads, load_profile(tmp_path / "three.json").config)


# -- the command -----------------------------------------------------------------------------------------------------


def test_cli_writes_a_profile_that_generate_and_spec_accept(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny.json"
    argv = ["calibrate", "--model", str(tiny_model_dir), "--budget-bits", "4.5", "--base", BASE, "--bits", "2,4"]
    assert cli.main([*argv, "--tokens", "80", "--threads", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | K bits | V bits |" in printed and f"wrote {out}" in printed
    profile = load_profile(out)
    assert profile.model.layers == 2 and profile.tokens == 80 and profile.data_name == "calibration.txt"
    assert profile.method == "fisher"  # the default
    assert profile.average_bits <= 4.5 and profile.config.bits_per_value == profile.average_bits
    assert replace(profile.config, layer_bits=()) == parse_spec(BASE)
    assert all(k > 0 for row in profile.key_kl for k in row)
    assert cli.main(["spec", str(out)]) == 0
    assert "per-layer bits" in capsys.readouterr().out
    again = tmp_path / "tiny-8.json"  # another budget from the same measurements
    assert cli.main(["calibrate", "--from", str(out), "--budget-bits", "8", "-o", str(again)]) == 0
    capsys.readouterr()
    rich = load_profile(again)
    assert rich.config.layer_bits == ((4, 4), (4, 4)) and rich.key_kl == profile.key_kl
    assert rich.budget_bits == 8 and rich.average_bits == 6.0  # 4-bit codes + 2 metadata bits (group 16)
    assert rich.method == "fisher"
    emulated = tmp_path / "tiny-emulated.json"
    assert cli.main([*argv, "--tokens", "80", "--threads", "1", "--method", "emulate", "-o", str(emulated)]) == 0
    capsys.readouterr()
    assert load_profile(emulated).method == "emulate"
    gen = ["generate", "--model", str(tiny_model_dir), "--cache", str(out), "--max-new-tokens", "4", "--threads", "1"]
    assert cli.main([*gen, "Hello"]) == 0
    assert profile.config.spec in capsys.readouterr().out


def test_cli_refuses_bad_options_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["calibrate", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "p.json")]
    assert cli.main([*base, "--budget-bits", "3", "--bits", "2,x"]) == 2
    assert "--bits '2,x'" in capsys.readouterr().err
    assert cli.main([*base, "--budget-bits", "3", "--base", "k4v4-plain-l22"]) == 2
    assert "already has per-layer bits" in capsys.readouterr().err


def test_compare_names_a_profile_by_its_file(llama: PreTrainedModel, tmp_path: Path) -> None:
    from kvpack.harness.caches import make_cache, parse_cache_name

    profile = make_profile()
    profile.save(tmp_path / "tiny-5.json")
    spec = parse_cache_name(str(tmp_path / "tiny-5.json"))
    assert (spec.name, spec.kind, spec.profile) == ("profile:tiny-5", "kvpack", str(tmp_path / "tiny-5.json"))
    assert spec.bits_per_value() == profile.config.bits_per_value
    assert make_cache(spec, llama.config).cache_config == profile.config
    with_backend = parse_cache_name(f"{tmp_path / 'tiny-5.json'}@torch")
    assert with_backend.name == "profile:tiny-5@torch" and make_cache(with_backend, llama.config).backend == "torch"


def test_a_base_whose_groups_do_not_fit_the_model_fails_before_measuring(llama: PreTrainedModel) -> None:
    from types import SimpleNamespace

    from kvpack.calibrate import calibrate

    def tokenizer(text: str, return_tensors: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.randint(0, 128, (1, 600)))

    with pytest.raises(
        ShapeError, match=r"the base spec k4v4-plain.*value head_dim 16 is not divisible by the value group size 32"
    ):
        calibrate(llama, tokenizer, 5.0, base="k4v4-plain-gk16-gv32")
