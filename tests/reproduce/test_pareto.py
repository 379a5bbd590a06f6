"""``ensemblekit reproduce pareto`` on smoke settings, and the Pareto front and cost bands it reports."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from ensemblekit.reproduce.pareto import METHODS, Point, band_edges, best_per_band, dominates, pareto_front, verdict

costs = st.floats(min_value=1.0, max_value=1e9, allow_nan=False)
accuracies = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
points = st.lists(st.tuples(st.sampled_from([1.0, 2.0, 4.0]) | costs, st.sampled_from([50.0, 90.0]) | accuracies),
                  min_size=1, max_size=30)


def test_smoke_run_writes_its_outputs(smoke_table):
    out, code, text = smoke_table("pareto")
    assert code == 0
    assert "settings: digits at 16x16" in text and "points by FLOPs" in text
    assert "best method per FLOPs band" in text and "best method per latency band" in text
    assert "By FLOPs, another method beats the single backbone" in text and "By latency" in text
    for name in ("pareto.json", "pareto.md", "pareto_flops.png", "pareto_latency.png"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "pareto.json").read_text())
    assert {p["method"] for p in record["points"]} == set(METHODS)
    assert record["settings"]["max_train_items"] == 128 and record["torch"] and "cpu" in record["device"]
    by_method = {m: [p for p in record["points"] if p["method"] == m] for m in METHODS}
    assert len(by_method["HNE"]) == 4 and len(by_method["deep ensemble"]) == 4
    assert len(by_method["multi-exit (budgeted)"]) == 3 and len(by_method["IRENE (learned halting)"]) == 1
    assert record["models"]["multi-exit x1/8"]["members"] == 5
    for p in record["points"]:
        assert p["flops"] > 0 and p["latency"] > 0 and 0 <= p["accuracy"] <= 100
    pairs = [(p["flops"], p["accuracy"]) for p in record["points"]]
    assert {i for i, p in enumerate(record["points"]) if p["front_flops"]} == set(pareto_front(pairs))
    assert len(list(out.glob("seed-0/*/run.json"))) == 8


@given(points)
def test_no_point_on_the_front_is_dominated(pts):
    front = pareto_front(pts)
    assert front and all(not dominates(q, pts[i]) for i in front for q in pts)
    assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


@given(points)
def test_every_point_off_the_front_is_dominated_by_one_on_it(pts):
    front = pareto_front(pts)
    for j in set(range(len(pts))) - set(front):
        assert any(dominates(pts[i], pts[j]) for i in front)


@given(points, st.lists(costs, max_size=4))
def test_each_band_names_its_most_accurate_point(pts, marks):
    edges = band_edges([c for c, _ in pts], marks)
    best = best_per_band(pts, edges)
    assert len(best) == len(edges) - 1
    found = [i for i in best if i is not None]
    assert len(found) == len(set(found))
    for band, (low, high) in enumerate(zip(edges, edges[1:])):
        inside = [a for c, a in pts if (low <= c if band == 0 else low < c) and c <= high]
        assert (best[band] is None) == (not inside)
        if inside:
            assert pts[best[band]][1] == max(inside)
    assert sum(1 for c, _ in pts if edges[0] <= c <= edges[-1]) == len(pts)  # every point falls in a band


def test_verdict_names_where_the_single_backbone_stays_best():
    pts = [Point("single backbone", "small", 1.0, 1.0, 80.0, 1), Point("single backbone", "big", 4.0, 4.0, 85.0, 1),
           Point("HNE", "HNE k=2", 2.0, 5.0, 86.0, 2)]
    assert verdict(pts, lambda p: p.flops, "FLOPs", str).endswith(
        "1 of 2 sizes: big (4.0): HNE k=2 86.0% vs 85.0% at 2.0; the single backbone stays best for small (1.0).")
    assert verdict(pts, lambda p: p.latency, "latency", str).endswith(
        "0 of 2 sizes; the single backbone stays best for small (1.0), big (4.0).")
