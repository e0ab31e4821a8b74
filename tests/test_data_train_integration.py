"""train() passes the data options through: rotation=per_task reaches the training sampler, rotation=classes
trains on the 4x pool; a tiny run on the real mini-ImageNet sample works end to end."""
import pytest

import metalearn.data.benchmark as benchmark_module
import metalearn.train as train_module
from metalearn.config import load_config
from metalearn.data import EpisodeSampler

QUICK = "experiments/configs/omniglot_5w1s_quick.yaml"


def tiny(tmp_path, cache_dir, *extra):
    return load_config(QUICK, ["model.hidden=8", "outer.iterations=2", "outer.meta_batch_size=2", "eval.episodes=2",
                               "eval.query_shots=2", "data.query_shots=2", f"data.cache_dir={cache_dir}",
                               f"tracking.out_dir={tmp_path}", "tracking.progress=false", *extra])


@pytest.mark.parametrize("rotation,expect_rotate", [("per_task", True),
                                                    pytest.param("classes", False, marks=pytest.mark.slow)])
def test_rotation_reaches_the_training_sampler(data_root, cache_dir, tmp_path, monkeypatch, rotation, expect_rotate):
    monkeypatch.setenv("METALEARN_DATA", str(data_root))
    made = []

    class Recording(EpisodeSampler):
        def __init__(self, images, *args, **kwargs):
            made.append((images.shape[0], kwargs.get("rotate", False)))
            super().__init__(images, *args, **kwargs)

    monkeypatch.setattr(benchmark_module, "EpisodeSampler", Recording)
    train_module.train(tiny(tmp_path, cache_dir, f"data.rotation={rotation}", "data.split=vinyals",
                            "data.rotation_splits=[train]"))
    assert made == [(4 * 1028 if rotation == "classes" else 1028, expect_rotate)]


@pytest.mark.slow
def test_tiny_run_on_the_mini_imagenet_sample(data_root, cache_dir, tmp_path):
    root = data_root / "mini-imagenet-sample"
    if not root.is_dir():
        pytest.skip("no mini-imagenet-sample")
    summary = train_module.train(tiny(tmp_path, cache_dir, "data.dataset=mini-imagenet", f"data.root={root}",
                                      "data.split=standard", "data.image_size=84"))
    assert summary is not None
