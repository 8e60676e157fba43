"""`kvpack compare` end to end on a tiny local model (random weights, the default model's tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpack.bench.compare import run_compare
from kvpack.bench.report import markdown, write_report


def test_compare_writes_a_complete_result(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    caches = "k8v8-g16-r16,k2v2-plain-g16-r0"
    if __import__("importlib").util.find_spec("optimum") is not None:
        caches += ",quanto-int4-g16-r16"
    partials: list[int] = []
    result = run_compare(
        caches.split(","), tokens=48, data=data, model_name=str(tiny_model_dir), contexts=[32, 64], steps=2,
        checkpoint=lambda partial: partials.append(len(partial["rows"])),
    )  # fmt: skip
    assert result["complete"] is True
    names = [row["cache"] for row in result["rows"]]
    assert names[0] == "fp" and len(names) == len(caches.split(",")) + 1  # fp added as the reference
    assert partials == list(range(1, len(names) + 1))  # a checkpoint after each streamed cache
    assert result["data"]["tokens"] == 48 and len(result["data"]["sha256"]) == 64
    for row in result["rows"]:
        assert row["predictions"] == 47
        for context in (32, 64):
            assert row[f"tokens_per_s@{context}"] > 0 and row[f"cache_bytes@{context}"] > 0
    fp, two_bit = result["rows"][0], result["rows"][names.index("k2v2-plain-g16-r0")]
    assert fp["speed_vs_fp@64"] == 1.0 and fp["delta_ppl_pct"] == 0.0
    assert two_bit["mean_kl"] > 0 and 0 <= two_bit["top1_agreement"] <= 1
    assert fp["vs_fp16@64"] == pytest.approx(0.5)  # a float32 cache is twice a float16 one

    path = tmp_path / "compare.json"
    path.write_text(json.dumps(result))
    md_path, png_path = write_report(path)
    page = md_path.read_text()
    assert all(name in page for name in names) and "tok/s @64" in page
    assert png_path.stat().st_size > 10_000
    assert markdown(result) == page


@pytest.mark.skipif(__import__("importlib").util.find_spec("optimum") is None, reason="needs optimum-quanto")
def test_compare_with_quantized_weights_adds_a_row_per_weight_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = run_compare(
        ["fp", "k8v8-g16-r16"], weights=["int8"], tokens=24, data=data, model_name=str(tiny_model_dir), contexts=[32],
        steps=1,
    )  # fmt: skip
    keys = [(row["weights"], row["cache"]) for row in result["rows"]]
    # fp weights come first (the reference), then each cache again with int8 weights.
    assert keys == [("fp", "fp"), ("fp", "k8v8-g16-r16"), ("int8", "fp"), ("int8", "k8v8-g16-r16")]
    assert result["weights"]["int8"] < result["weights"]["fp"]
    int8_fp = result["rows"][2]
    assert int8_fp["delta_ppl_vs_fp_weights_pct"] == pytest.approx(int8_fp["delta_ppl_pct"])  # same reference
    assert int8_fp["mean_kl"] > 0  # the weights changed the model's output
    assert int8_fp["total_bytes@32"] == result["weights"]["int8"] + int8_fp["cache_bytes@32"]
    page = markdown(result)
    assert "| weights |" in page and "ΔPPL vs fp weights" in page and "weights + cache @32" in page


def test_a_resumed_compare_keeps_the_rows_it_had_and_streams_only_the_others(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvpack.bench import compare
    from kvpack.errors import ConfigError

    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    settings = {"tokens": 32, "data": data, "model_name": str(tiny_model_dir)}
    first = run_compare(["k8v8-g16-r16"], **settings)
    cut_off = {**first, "complete": False}
    streamed: list[str] = []
    real_stream = compare.stream

    def counted(model: object, ids: object, spec: object, **kwargs: object) -> object:
        streamed.append(spec.name)  # type: ignore[attr-defined]
        return real_stream(model, ids, spec, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compare, "stream", counted)
    both = run_compare(["k8v8-g16-r16", "k2v2-plain-g16-r0"], resume=cut_off, **settings)
    assert streamed == ["fp", "k2v2-plain-g16-r0"]  # the reference again, and only the cache the run lacked
    rows = {row["cache"]: row for row in both["rows"]}
    assert list(rows) == ["fp", "k8v8-g16-r16", "k2v2-plain-g16-r0"] and both["complete"] is True
    kept = rows["k8v8-g16-r16"]
    assert kept["measured"] == first["date"] and kept["mean_kl"] == first["rows"][1]["mean_kl"]
    assert "measured" not in rows["k2v2-plain-g16-r0"]
    assert f"- resumed: k8v8-g16-r16 measured on {first['date']}" in markdown(both)
    assert rows["fp"]["ppl"] == pytest.approx(first["rows"][0]["ppl"])  # the reference streamed again is the same

    with pytest.raises(ConfigError, match="data tokens"):
        run_compare(["k8v8-g16-r16"], resume=first, **{**settings, "tokens": 24})


def test_compare_resume_reads_the_out_file_and_refuses_another_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvpack import cli

    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run.json"
    argv = ["compare", "--model", str(tiny_model_dir), "--data", str(data), "--tokens", "24", "--contexts", "",
            "--out", str(out)]  # fmt: skip
    assert cli.main([*argv, "--caches", "k8v8-g16-r16"]) == 0
    first = json.loads(out.read_text())
    assert cli.main([*argv, "--caches", "k8v8-g16-r16,k4v4-plain-g16-r16", "--resume"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["cache"] for row in rows] == ["fp", "k8v8-g16-r16", "k4v4-plain-g16-r16"]
    assert rows[1]["measured"] == first["date"] and "measured" not in rows[2]
    other = tmp_path / "other.txt"
    other.write_text("Pack my box with five dozen liquor jugs. " * 40)
    argv[argv.index(str(data))] = str(other)
    assert cli.main([*argv, "--caches", "k8v8-g16-r16", "--resume"]) == 2  # a clear error, not a mixed table
