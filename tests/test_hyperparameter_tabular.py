"""Tabular loaders (row counts and label rates as documented with the data) and the splits."""

from __future__ import annotations

import sys

import pytest
import torch

from bilevel.problems.hyperparameter.splits import split
from bilevel.problems.hyperparameter.tabular import load_tabular

EXPECTED = {  # rows, positive labels (the counts stated in the data sets' README and by ProPublica)
    "adult": (48_842, 7_841 + 3_846),
    "bank": (41_188, 4_640),
    "compas": (6_172, None),
    "german": (1_000, 700),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tabular_sets_load_with_their_documented_sizes(name, shared_data):
    table = load_tabular(name, shared_data)
    rows, positives = EXPECTED[name]
    assert table.x.shape[0] == rows == table.y.shape[0]
    assert table.x.dtype == torch.float64 and bool(torch.isfinite(table.x).all())
    assert table.n_classes == 2 and len(table.feature_names) == table.x.shape[1]
    if positives is not None:
        assert int(table.y.sum()) == positives
    one_hot = [i for i, n in enumerate(table.feature_names) if "=" in n]
    assert one_hot and bool(((table.x[:, one_hot] == 0) | (table.x[:, one_hot] == 1)).all())


def test_bank_drops_duration_which_leaks_the_label(shared_data):
    assert not any(n.startswith("duration") for n in load_tabular("bank", shared_data).feature_names)


def test_split_is_disjoint_and_standardized_on_training_statistics():
    x = torch.arange(200, dtype=torch.float64).reshape(100, 2) * torch.tensor([1.0, 0.0])
    y = torch.arange(100) % 2
    parts = split(x, y, n_train=50, n_val=20, n_test=30, seed=3)
    assert (parts.x_train.shape[0], parts.x_val.shape[0], parts.x_test.shape[0]) == (50, 20, 30)
    assert torch.allclose(parts.x_train.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert parts.x_train[:, 0].std().item() == pytest.approx(1.0)
    assert bool((parts.x_train[:, 1] == 0).all())  # a constant column is centred, not divided by 0
    ids = split(x, y, n_train=50, n_val=20, n_test=30, seed=3, standardize=False)
    seen = torch.cat([ids.x_train[:, 0], ids.x_val[:, 0], ids.x_test[:, 0]])
    assert sorted(seen.tolist()) == [2.0 * i for i in range(100)]
    with pytest.raises(ValueError, match="cannot split 100 examples"):
        split(x, y, n_train=90, n_val=20)


def test_unknown_set_and_missing_scikit_learn_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown tabular data set 'nope'"):
        load_tabular("nope")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_tabular("digits")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_tabular("german", tmp_path)


def test_scikit_learn_bundled_set_when_installed():
    pytest.importorskip("sklearn")
    digits = load_tabular("digits")
    assert digits.x.shape == (1797, 64) and digits.n_classes == 10
