from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hwnas.evaluators.data import DigitsData, SyntheticData

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def digits(**overrides) -> DigitsData:
    kwargs = dict(resolution=16, channels=1, val_fraction=0.15, test_fraction=0.15, batch_size=32, seed=0)
    kwargs.update(overrides)
    return DigitsData(**kwargs)


def synthetic(**overrides) -> SyntheticData:
    kwargs = dict(
        n_samples=200,
        num_classes=4,
        resolution=8,
        channels=1,
        val_fraction=0.2,
        test_fraction=0.2,
        batch_size=16,
        seed=0,
    )
    kwargs.update(overrides)
    return SyntheticData(**kwargs)


def test_digits_splits_cover_all_images_stratified_and_standardised():
    dm = digits()
    sizes = {s: len(dm.arrays(s)[1]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=2)
    assert sizes["test"] == pytest.approx(0.15 * 1797, abs=2)
    for split in ("train", "val", "test"):
        x, y = dm.arrays(split)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), 1, 16, 16)
        assert set(np.unique(y)) == set(range(10))  # stratified: every class in every split
    x_train, _ = dm.arrays("train")
    assert abs(float(x_train.mean())) < 1e-4
    assert float(x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert dm.input_shape == (1, 16, 16) and dm.num_classes == 10


def test_split_is_a_function_of_the_seed():
    a, b, c = digits(seed=3), digits(seed=3), digits(seed=4)
    np.testing.assert_array_equal(a.arrays("val")[0], b.arrays("val")[0])
    assert not np.array_equal(a.arrays("val")[1], c.arrays("val")[1])


def test_splits_are_disjoint():
    dm = digits(resolution=8)  # no resize: rows are the original images, so duplicates would show
    rows = {s: {r.tobytes() for r in dm.arrays(s)[0]} for s in ("train", "val", "test")}
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


def test_three_channels_replicate_one():
    x, _ = digits(channels=3, resolution=32).arrays("test")
    assert x.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(x[:, 0], x[:, 1])
    np.testing.assert_array_equal(x[:, 0], x[:, 2])


def test_lightning_datamodule_yields_batches_of_the_right_shape():
    from hwnas.evaluators.train import SplitsDataModule

    data = synthetic(channels=3, resolution=12)
    dm = SplitsDataModule(data, seed=0)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert tuple(xb.shape) == (16, 3, 12, 12) and yb.dtype.is_floating_point is False
    assert sum(len(b[1]) for b in dm.val_dataloader()) == len(data.arrays("val")[1])
    assert sum(len(b[1]) for b in dm.test_dataloader()) == len(data.arrays("test")[1])


def test_synthetic_classes_are_separable_by_their_means():
    dm = synthetic(n_samples=400)
    x_train, y_train = dm.arrays("train")
    x_val, y_val = dm.arrays("val")
    centroids = np.stack([x_train[y_train == k].mean(axis=0).ravel() for k in range(4)])
    dist = ((x_val.reshape(len(x_val), -1)[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == y_val).mean() > 0.9


def test_pickle_ships_the_recipe_not_the_arrays():
    dm = synthetic()
    before = dm.arrays("val")[0]
    blob = pickle.dumps(dm)
    assert len(blob) < 10_000  # the recipe and where its cache is, not the images
    clone = pickle.loads(blob)
    assert clone._cache is None and clone._memo == {}
    np.testing.assert_array_equal(clone.arrays("val")[0], before)


@pytest.mark.parametrize(
    "overrides, word",
    [
        ({"resolution": 4}, "resolution"),
        ({"channels": 2}, "channels"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_kwargs_raise_one_line_value_errors(overrides, word):
    with pytest.raises(ValueError, match=word) as info:
        digits(**overrides)
    assert "\n" not in str(info.value)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        synthetic().arrays("validation")


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_configs_instantiate(name):
    dm = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    x, y = dm.arrays("train")
    assert x.shape[1:] == dm.input_shape and y.max() < dm.num_classes
