"""split-user-item on models that are not mixers (issue 27, item 8): a DIN's user tower and history
become the user segment, a two-tower model's user tower too; ``inspect`` predicts the saving before
any build (the same formula and numbers as the pass's report) and ``bench --compare`` measures it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.corpus import BY_NAME, save_case


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The corpus two-tower program, built split and unsplit."""
    root = tmp_path_factory.mktemp("split-nonmixer")
    pt2 = save_case(BY_NAME["two_tower"], root / "two_tower.pt2")
    for name, args in (("split", ("--passes", "split-user-item")), ("unsplit", ("--no-passes",))):
        r = run_cli("build", str(pt2), "--out", str(root / name), "--no-bench", *args)
        assert r.code == 0, r.err[-3000:]
    return pt2, root / "split", root / "unsplit"


def _split_report(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return next(p["report"] for p in manifest["passes"] if p["name"] == "split-user-item")


def test_inspect_predicts_what_the_pass_reports(two_tower: tuple[Path, Path, Path]) -> None:
    pt2, split, _ = two_tower
    r = run_cli("inspect", str(pt2), "--json", "--no-timing")
    assert r.code == 0, r.err[-3000:]
    predicted = json.loads(r.out)["split_prediction"]
    report = _split_report(split)
    assert predicted["user_share_of_flops"] >= 0.5  # the user tower is most of the model
    for key in ("flops_per_row_unsplit", "flops_per_user", "flops_per_candidate"):
        assert predicted[key] == report[key], key
    assert predicted["predicted_speedup"] == pytest.approx(report["predicted_speedup"])
    assert predicted["predicted_speedup"]["256"] > 1.3
    text = run_cli("inspect", str(pt2), "--no-timing").out
    assert "split-user-item would run 94% of the FLOPs once per user" in text


def test_inspect_has_no_prediction_where_the_split_is_refused(tmp_path: Path) -> None:
    r = run_cli("inspect", str(save_case(BY_NAME["deepfm"], tmp_path / "deepfm.pt2")), "--json", "--no-timing")
    assert r.code == 0, r.err[-3000:]
    info = json.loads(r.out)
    assert info["split_prediction"] is None and "user inputs meet item inputs" in info["passes"]["split-user-item"]


def test_bench_measures_the_split_beside_the_prediction(two_tower: tuple[Path, Path, Path]) -> None:
    _, split, unsplit = two_tower
    r = run_cli("bench", str(split), "--compare", str(unsplit), "--candidates", "1,16", "--budget", "0.05",
                "--json")
    assert r.code == 0, r.err[-3000:]
    gain = json.loads(r.out)["split_gain"]
    assert gain["split"].startswith("bundle") and gain["unsplit"].startswith("compare")
    predicted = _split_report(split)["predicted_speedup"]
    for n in ("1", "16"):
        row = gain["per_n"][n]
        assert row["measured"] == pytest.approx(row["unsplit_p50_ms"] / row["split_p50_ms"])
        assert row["predicted"] == pytest.approx(predicted[n])
    assert isinstance(gain["never_slower"], bool)
    text = run_cli("bench", str(unsplit), "--compare", str(split), "--candidates", "16", "--budget", "0.05").out
    assert "Split vs unsplit" in text and "N=16:" in text and "predicted" in text  # either way round


def test_din_user_segment_holds_tower_history_and_mask(tmp_path: Path) -> None:
    """The cut the issue names: the user tower's output, the history's embeddings and its padding
    mask cross to the item segment, which runs the target attention per candidate."""
    pt2 = save_case(BY_NAME["din"], tmp_path / "din.pt2")
    r = run_cli("build", str(pt2), "--out", str(tmp_path / "b"), "--no-bench", "--passes", "split-user-item")
    assert r.code == 0, r.err[-3000:]
    report = _split_report(tmp_path / "b")
    shapes = sorted(tuple(b["shape"]) for b in report["boundary"])
    assert shapes == [("users", 6, 1), ("users", 6, 8), ("users", 8)]  # mask, history, user tower
    assert 0 < report["user_share_of_flops"] < 1 and report["predicted_speedup"]["256"] > 1.0


def test_own_models_page_shows_the_result_file() -> None:
    """docs/own-models.md's split table holds the numbers of benchmarks/results/split_nonmixer.json
    (rerun the benchmark, then update the page: no figure typed by hand)."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "own-models.md").read_text()
    results = json.loads((root / "benchmarks" / "results" / "split_nonmixer.json").read_text())["results"]
    assert results
    for r in results:
        row = (f"| {r['model']} | {r['user_share_of_flops']:.0%} | {r['candidates']} | {r['unsplit_p50_ms']:.3g} | "
               f"{r['split_p50_ms']:.3g} | {r['x_split_vs_unsplit']:.2f}x | {r['predicted_x_split_vs_unsplit']:.2f}x |")
        assert row in page, row
    two_tower = [r for r in results if r["model"] == "two_tower" and r["candidates"] == 256]
    assert two_tower and two_tower[0]["user_share_of_flops"] >= 0.5
