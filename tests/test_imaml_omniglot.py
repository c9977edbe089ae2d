"""Omniglot for iMAML: archive validation and errors, decoding and cache, the task sampler,
the official one-shot runs, and a short meta-training on the real archives."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

from bilevel.problems.imaml import omniglot
from bilevel.problems.imaml.omniglot import OmniglotError, content_digest, load_official_runs, load_omniglot
from bilevel.problems.imaml.tasks import OmniglotTasks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def data(shared_data, cache):
    return load_omniglot(shared_data / "omniglot", cache, download=False)


def test_shared_archives_have_the_documented_content_digests(shared_data):
    for name in ("images_background.zip", "images_evaluation.zip", "all_runs.zip"):
        assert content_digest(shared_data / "omniglot" / name) == omniglot.ARCHIVES[name][0]


def test_decoded_images_and_split(data):
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.characters[0].startswith("images_background/Alphabet_of_the_Magi/character01")
    assert data.characters[964].startswith("images_evaluation/Angelic/character01")
    # strokes are bright on a dark background: few pixels are inked
    assert 10 < data.images.mean() < 60 and data.images.max() == 255
    train, test = data.split()
    assert len(train) == 1200 and len(test) == 423


def test_random_split_is_a_seeded_partition_across_alphabets(data):
    train, test = data.split(scheme="random")
    assert len(train) == 1200 and len(test) == 423
    again_train, _ = data.split(scheme="random")
    other_train, _ = data.split(scheme="random", seed=2)
    assert np.array_equal(train, again_train) and not np.array_equal(train, other_train)
    key = {c.tobytes(): i for i, c in enumerate(data.images)}
    train_ids = {key[c.tobytes()] for c in train}
    test_ids = {key[c.tobytes()] for c in test}
    assert len(train_ids | test_ids) == 1623 and not train_ids & test_ids
    alphabet = [name.split("/")[1] for name in data.characters]
    # unlike the default split, most test characters share an alphabet with training ones
    shared = sum(alphabet[i] in {alphabet[j] for j in train_ids} for i in test_ids)
    assert shared > 0.9 * len(test_ids)
    _, default_test = data.split()
    default_ids = {key[c.tobytes()] for c in default_test}
    default_train_alphabets = {alphabet[j] for j in set(range(1623)) - default_ids}
    unseen = sum(alphabet[i] not in default_train_alphabets for i in default_ids)
    assert unseen >= 382  # the ten alphabets of the official runs


def test_unknown_split_scheme_is_refused(data):
    from bilevel.problems.imaml.config import Config

    with pytest.raises(ValueError, match="scheme must be one of"):
        data.split(scheme="alphabets")
    with pytest.raises(ValueError, match="split must be one of"):
        Config(dataset="omniglot", split="alphabets").resolved()


def test_official_runs_characters_are_held_out_of_meta_training(shared_data, data):
    runs = load_official_runs(shared_data / "omniglot", download=False)
    assert len(runs) == 20
    for run in runs:
        assert run.support.shape == run.query.shape == (20, 28, 28)
        assert sorted(run.labels.tolist()) == list(range(20))  # one query drawing per class
    train, test = data.split()
    seen = {d.tobytes() for d in train.reshape(-1, 28, 28)}
    held_out = {d.tobytes() for d in test.reshape(-1, 28, 28)}
    drawings = [d.tobytes() for run in runs for d in (*run.support, *run.query)]
    assert all(d in held_out for d in drawings) and not any(d in seen for d in drawings)


def test_official_runs_evaluation_adapts_a_20_way_classifier(shared_data):
    import torch

    from bilevel.problems.imaml import IMAMLProblem, conv4_forward, conv4_init, cross_entropy
    from bilevel.problems.imaml.evaluation import official_runs_accuracy

    problem = IMAMLProblem(conv4_forward, cross_entropy, lam=0.0, inner_lr=0.5, inner_steps=2)
    theta = conv4_init(20, channels=8, generator=torch.Generator().manual_seed(0))
    result = official_runs_accuracy(problem, theta, shared_data / "omniglot")
    assert len(result["per_run"]) == 20
    assert all(abs(a * 20 - round(a * 20)) < 1e-9 for a in result["per_run"])  # k of 20 drawings right
    assert result["accuracy"] == pytest.approx(sum(result["per_run"]) / 20)
    assert result["accuracy"] > 1 / 20  # adapting on the support drawings beats chance


def test_second_load_comes_from_the_cache(shared_data, cache, data, monkeypatch):
    assert len(list(cache.glob("omniglot28-*.npz"))) == 1

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded again instead of read from the cache")

    monkeypatch.setattr(omniglot, "_decode_archive", no_decoding)
    again = load_omniglot(shared_data, cache, download=False)  # the omniglot/ subfolder is found
    np.testing.assert_array_equal(again.images, data.images)
    assert again.characters == data.characters


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(shared_data))
    assert omniglot.data_directory() == shared_data / "omniglot"
    assert omniglot.locate_archive("all_runs.zip", download=False).name == "all_runs.zip"


def test_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(OmniglotError, match="images_background.zip not found") as err:
        load_omniglot(tmp_path, tmp_path, download=False)
    assert str(tmp_path) in str(err.value) and "raw.githubusercontent.com/brendenlake/omniglot" in str(err.value)


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(name, dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(omniglot, "_download", offline)
    with pytest.raises(OmniglotError, match="download from .* failed: network is unreachable"):
        omniglot.locate_archive("images_evaluation.zip", tmp_path)


def test_modified_archive_fails_the_digest(shared_data, tmp_path):
    source = shared_data / "omniglot" / "all_runs.zip"
    target = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for i, name in enumerate(src.namelist()):
            payload = src.read(name)
            dst.writestr(name, payload + b"\0" if i == 3 else payload)  # one drawing altered
    with pytest.raises(OmniglotError, match="content digest .* corrupt or not the official"):
        omniglot.locate_archive("all_runs.zip", tmp_path, download=False)


def test_repacked_archive_passes_and_truncated_one_fails(shared_data, tmp_path):
    source = shared_data / "omniglot" / "all_runs.zip"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp_path / "all_runs.zip", "w",
                                                         compression=zipfile.ZIP_STORED) as dst:
        for name in reversed(src.namelist()):  # other order, other compression: same content
            dst.writestr(name, src.read(name))
    assert omniglot.locate_archive("all_runs.zip", tmp_path, download=False).is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copyfile(source, broken / "all_runs.zip")
    with open(broken / "all_runs.zip", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(OmniglotError, match="not a readable zip archive"):
        omniglot.locate_archive("all_runs.zip", broken, download=False)


def test_sampler_draws_distinct_classes_and_drawings(data):
    train, _ = data.split()
    sampler = OmniglotTasks(train, ways=5, shots=2, queries=3, rotations=True)
    tasks = sampler.sample(np.random.default_rng(0), 6)
    assert tasks.support_x.shape == (6, 10, 1, 28, 28) and tasks.query_x.shape == (6, 15, 1, 28, 28)
    assert tasks.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert float(tasks.support_x.max()) == 1.0 and float(tasks.support_x.min()) == 0.0
    support = tasks.support_x.reshape(6, 5, 2, -1)
    query = tasks.query_x.reshape(6, 5, 3, -1)
    for t in range(6):  # no drawing is both in the support and the query set
        for c in range(5):
            for s in range(2):
                assert not any(bool((support[t, c, s] == query[t, c, q]).all()) for q in range(3))
    again = sampler.sample(np.random.default_rng(0), 6)
    assert all(bool((a == b).all()) for a, b in zip(tasks, again))
    with pytest.raises(ValueError, match="exceeds the 20 drawings"):
        OmniglotTasks(train, ways=5, shots=10, queries=11)


def test_sampler_uses_rotated_classes(data):
    images = data.images[:2]
    sampler = OmniglotTasks(images, ways=8, shots=1, queries=0, rotations=True)  # all 8 classes
    tasks = sampler.sample(np.random.default_rng(1), 1)
    originals = {images[c, d].tobytes() for c in range(2) for d in range(20)}
    pictures = (tasks.support_x[0, :, 0] * 255).round().byte().numpy()
    assert sum(p.tobytes() in originals for p in pictures) == 2  # 6 of 8 classes are rotated


def test_short_meta_training_learns_on_held_out_characters(data, tmp_path):
    from bilevel.problems.imaml.config import Config
    from bilevel.problems.imaml.train import train

    config = Config(dataset="omniglot", ways=5, shots=1, queries=2, channels=16, meta_batch=4, inner_steps=3,
                    lam=0.5, inner_lr=0.4, steps=20, log_every=10, eval_every=20, checkpoint_every=20,
                    eval_tasks=20, final_tasks=20, out_dir=str(tmp_path), progress=False)
    final = train(config, omniglot_images=data.split())
    test = final["test"]
    assert test["loss_after"] < test["loss_before"]
    assert test["acc_after"] > test["acc_before"] + 0.1  # chance is 0.2
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
