"""The data options of the config: rotation settings, split names, split file; open_dataset's errors."""
import pytest

from metalearn.config import load_config
from metalearn.data import DATASETS, SPLITS, open_dataset
from metalearn.errors import MetalearnError


def test_rotation_options_parse_and_validate():
    cfg = load_config(None, ["data.rotation=classes", "data.rotation_splits=[train]"])
    assert cfg.data.rotation == "classes" and cfg.data.rotation_splits == ["train"]
    assert load_config(None, []).data.rotation == "none"
    choices = r"data.rotation: Invalid value 'sideways', expected one of \[none, classes, per_task\]"
    with pytest.raises(MetalearnError, match=choices):
        load_config(None, ["data.rotation=sideways"])
    with pytest.raises(MetalearnError, match=r"data.rotation_splits\[1\]: Invalid value 'holdout'"):
        load_config(None, ["data.rotation_splits=[train,holdout]"])


def test_every_data_set_has_splits_and_a_config_name():
    assert set(DATASETS) == set(SPLITS) >= {"omniglot", "mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100",
                                            "folder"}
    for name in DATASETS:
        load_config(None, [f"data.dataset={name}", f"data.split={next(iter(SPLITS[name]))}"])


def test_open_dataset_errors_name_the_problem(tmp_path):
    cfg = load_config(None, ["data.dataset=mini-imagenet", f"data.root={tmp_path / 'nowhere'}", "data.split=standard"])
    with pytest.raises(MetalearnError, match="mini-imagenet: data folder .*nowhere does not exist"):
        open_dataset(cfg.data)
    cfg = load_config(None, ["data.dataset=mini-imagenet", f"data.root={tmp_path}", "data.split=maml"])
    with pytest.raises(MetalearnError, match="unknown split 'maml' for mini-imagenet; known: standard"):
        open_dataset(cfg.data)
