"""Omniglot's three standard splits and its rotations, on the real data (skipped without METALEARN_DATA)."""
import pytest
import torch

from metalearn.config import DataConfig
from metalearn.data import open_dataset, omniglot_lake_split, omniglot_vinyals_split
from metalearn.errors import MetalearnError

from test_data_helpers import assert_episodes_leak_free


def config(data_root, cache_dir, **kw) -> DataConfig:
    return DataConfig(root=str(data_root / "omniglot"), cache_dir=str(cache_dir), **kw)


def test_vinyals_split_sizes_and_alphabets(omniglot):
    s = omniglot_vinyals_split(omniglot.class_names)
    assert [len(s[k]) for k in ("train", "val", "test")] == [1028, 172, 423]
    alphabets = {k: {omniglot.class_names[i].split("/")[1] for i in v.tolist()} for k, v in s.items()}
    assert alphabets["val"] == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    assert len(alphabets["test"]) == 13 and "Gurmukhi" in alphabets["test"] and "Gurmukhi" in alphabets["train"]
    assert all(omniglot.class_names[i].startswith("images_evaluation/") for i in s["test"].tolist())


def test_lake_split_is_background_vs_evaluation(omniglot):
    s = omniglot_lake_split(omniglot.class_names)
    assert [len(s[k]) for k in ("train", "val", "test")] == [964, 0, 659]
    assert all(omniglot.class_names[i].startswith("images_background/") for i in s["train"].tolist())
    alphabets = {omniglot.class_names[i].split("/")[1] for i in s["test"].tolist()}
    assert len(alphabets) == 20


def test_named_splits_reject_a_wrong_character_set():
    with pytest.raises(MetalearnError, match="1028/172/423"):
        omniglot_vinyals_split(["images_background/Latin/character01"] * 10)


@pytest.mark.parametrize("split", ["maml", "vinyals", "lake"])
def test_sampled_episodes_never_cross_splits(data_root, cache_dir, split):
    ds, splits = open_dataset(config(data_root, cache_dir, split=split))
    assert_episodes_leak_free(ds.images, splits, tasks=30)


def test_rotation_as_new_classes(data_root, cache_dir):
    ds, splits = open_dataset(config(data_root, cache_dir, split="vinyals", rotation="classes",
                                     rotation_splits=["train"]))
    assert [len(splits[k]) for k in ("train", "val", "test")] == [4 * 1028, 172, 423]
    assert ds.images.shape == (4 * 1623, 20, 1, 28, 28) and ds.channels == 1 and ds.samples_per_class == 20
    c = int(splits["train"][0])
    for k in range(4):
        assert torch.equal(ds.images[c + k * 1623], torch.rot90(ds.images[c], k, dims=(-2, -1)))
        assert ds.class_names[c + k * 1623].startswith(ds.class_names[c])
    assert_episodes_leak_free(ds.images, splits, tasks=20)
