"""Task loaders and episodes of the fair meta-learning problem (real data under shared_data)."""

from __future__ import annotations

import pytest
import torch

from bilevel.problems.fair.data import DATASETS, load_tasks, sample_episodes, split_tasks, evaluation_episodes


@pytest.fixture(scope="module")
def communities(shared_data):
    return load_tasks("communities", shared_data)


def test_communities_tasks_are_states_with_median_labels_and_both_groups(communities):
    assert len(communities) >= 15
    # states whose crime rates are all missing (0 in PDFM's csv) are not tasks
    assert not {"IL", "MI", "MN"} & {t.name for t in communities}
    for task in communities:
        assert task.x.shape == (len(task), 97)  # 98 PDFM features minus x23
        assert set(task.y.unique().tolist()) <= {0.0, 1.0} and set(task.z.unique().tolist()) == {0.0, 1.0}
        # label 1 strictly above the task median: at most half the rows (fewer with ties)
        assert 0.4 < task.y.mean() <= 0.5
        torch.testing.assert_close(task.x.mean(0), torch.zeros(97, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "communities"])
def test_every_dataset_loads_as_binary_tasks(shared_data, name):
    tasks = load_tasks(name, shared_data)
    assert len(tasks) >= 10
    assert len({t.name for t in tasks}) == len(tasks)
    for task in tasks:
        assert len(task) >= 20 and torch.isfinite(task.x).all()
        assert set(task.y.unique().tolist()) <= {0.0, 1.0}
        assert min(int((task.z == 0).sum()), int(task.z.sum())) >= 2


def test_split_is_disjoint_and_seeded(communities):
    train, test = split_tasks(communities, 0.2, seed=3)
    assert {t.name for t in train}.isdisjoint({t.name for t in test})
    assert len(train) + len(test) == len(communities)
    assert [t.name for t in split_tasks(communities, 0.2, seed=3)[1]] == [t.name for t in test]


def test_episodes_have_disjoint_support_and_query(communities):
    g = torch.Generator().manual_seed(0)
    batch = sample_episodes(communities, 4, 10, 7, g)
    assert batch["xs"].shape == (4, 10, 97) and batch["yq"].shape == (4, 7)
    for i in range(4):  # no support row reappears in the query set
        dist = torch.cdist(batch["xs"][i], batch["xq"][i])
        assert dist.min() > 0
    task = communities[0]
    ep = evaluation_episodes(task, 3, 10, g)
    assert ep["xs"].shape == (3, 10, 97) and ep["xq"].shape == (3, len(task) - 10, 97)
    big = max(communities, key=len)
    assert evaluation_episodes(big, 2, 10, g, max_query=15)["xq"].shape == (2, 15, 97)


def test_errors_name_the_fix(shared_data, communities):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_tasks("mnist", shared_data)
    with pytest.raises(ValueError, match="lower n_query"):
        sample_episodes(communities, 2, 10, 10_000, torch.Generator())


def test_to_device_moves_every_tensor_and_episodes_follow(communities):
    from bilevel.problems.fair.data import to_device
    moved = to_device(communities[:3], "meta")
    assert [t.name for t in moved] == [t.name for t in communities[:3]]
    assert all(t.x.is_meta and t.y.is_meta and t.z.is_meta for t in moved)
    assert all(t.x.shape == s.x.shape for t, s in zip(moved, communities))
    here = sample_episodes(communities[:3], 2, 5, 5, torch.Generator().manual_seed(1))
    there = sample_episodes(moved, 2, 5, 5, torch.Generator().manual_seed(1))
    assert all(there[k].is_meta and there[k].shape == here[k].shape for k in here)
