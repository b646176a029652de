"""Downstream evaluation's parts: class-balanced label subsets, kNN on a known toy set, a probe
grid that never sees test labels, and per-group metrics against a hand-computed example."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framework.errors import ConfigError
from framework.evaluate.downstream import report as downstream
from framework.evaluate.downstream.features import Split
from framework.evaluate.downstream.subgroups import subgroup_report
from framework.evaluate.downstream.subsets import balanced_subset
from framework.evaluate.probes import knn_predict


def test_label_subsets_are_class_balanced_and_reproducible():
    labels = np.array([0] * 100 + [5] * 40 + [9] * 20)
    subset = balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[subset]).tolist()[0] == 10 and (labels[subset] == 5).sum() == 4 and (labels[subset] == 9).sum() == 2
    assert np.array_equal(subset, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, balanced_subset(labels, 0.1, seed=4))
    assert len(np.unique(subset)) == len(subset)
    assert len(balanced_subset(labels, 1.0, seed=0)) == len(labels)
    with pytest.raises(ConfigError, match=r"leaves class 5 with no sample \(it has 40"):
        balanced_subset(labels, 0.01, seed=0)
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        balanced_subset(labels, 1.5, seed=0)


def test_knn_on_a_toy_set_with_a_known_answer():
    """Two clusters labelled 3 and 7 (not contiguous), and a point whose 3 nearest are 2 x 7 and 1 x 3."""
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([3, 3, 3, 7, 7, 7])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.45, 0.55]])
    assert knn_predict(train, labels, test, k=3, temperature=0.07).tolist() == [3, 7, 7]
    # with k = everything and a huge temperature every vote weighs the same: the majority (7: 4 of 7) wins
    assert knn_predict(torch.cat([train, train[3:4]]), torch.cat([labels, labels[3:4]]), test[:1], k=7,
                       temperature=1e6).tolist() == [7]


def test_the_probe_grid_never_sees_test_labels(monkeypatch, tmp_path):
    """Shuffling the test labels changes the scores, never the chosen hyper-parameters."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3

    def split(n: int, seed: int, shuffle: bool = False) -> Split:
        r = np.random.default_rng(seed)
        labels = r.integers(0, 4, n)
        features = (centres[labels] + r.normal(size=(n, 8))).astype(np.float32)
        if shuffle:
            labels = r.permutation(labels)
        return Split(features, labels.astype(np.int64), np.arange(seed * 1000, seed * 1000 + n))

    def run(shuffle: bool) -> dict:
        splits = {"data.train": split(200, 1), "data.val": split(60, 2), "data.test": split(80, 3, shuffle)}
        monkeypatch.setattr(downstream, "embed_split", lambda checkpoint, spec, key, *rest: splits[key])
        options = downstream.DownstreamOptions(checkpoint="unused", train="t", val="v", test="x", modes=["linear", "knn"],
                                               fractions=[0.1, 1.0], seeds=2, output=str(tmp_path / str(shuffle)))
        options.grid.steps = 50
        return downstream.run_downstream(options)

    honest, shuffled = run(False), run(True)
    chosen = [(r["lr"], r["weight_decay"]) for r in honest["rows"] if r["mode"] == "linear"]
    assert chosen == [(r["lr"], r["weight_decay"]) for r in shuffled["rows"] if r["mode"] == "linear"]
    assert min(r["accuracy"] for r in honest["rows"]) > 0.8 > max(r["accuracy"] for r in shuffled["rows"])
    out = tmp_path / "False"
    assert (out / "label_efficiency.png").stat().st_size > 1000
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 2 * 2 and csv_rows[0].startswith("mode,fraction,seed,labels,accuracy")
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {(s["mode"], s["fraction"], s["seeds"]) for s in summary} == {(m, f, 2) for m in ("linear", "knn") for f in (0.1, 1.0)}


def test_group_metrics_match_a_hand_computed_example():
    y_true = np.array([0, 1, 1, 0, 1, 0, 1, 0, 0])
    y_pred = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b", "c", "c"])
    report = subgroup_report(y_true, y_pred, groups, threshold=0.6, bootstrap=200)
    # a: 3 of 4 right; b: 1 of 3; c: 2 of 2; all: 6 of 9
    assert report["overall"]["accuracy"] == pytest.approx(6 / 9)
    a, b, c = (report["groups"][g] for g in "abc")
    assert (a["count"], b["count"], c["count"]) == (4, 3, 2)
    assert a["accuracy"] == pytest.approx(0.75) and b["accuracy"] == pytest.approx(1 / 3) and c["accuracy"] == 1.0
    # macro-F1 of a: class 0 (tp 2, fp 1, fn 0) F1 0.8; class 1 (tp 1, fp 0, fn 1) F1 2/3 -> 0.7333
    assert a["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # b: class 0 (tp 0, fp 1, fn 1) F1 0; class 1 (tp 1, fp 1, fn 1) F1 1/2 -> 1/4
    assert b["macro_f1"] == pytest.approx(0.25)
    assert b["gap"] == pytest.approx(1 / 3 - 6 / 9)
    assert report["worst_group"] == "b" and report["below_threshold"] == ["b"]
    assert b["accuracy_ci"][0] <= b["accuracy"] <= b["accuracy_ci"][1] and c["accuracy_ci"] == [1.0, 1.0]
