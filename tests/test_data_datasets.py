"""mini-ImageNet (CSV layout on the real sample, pickle layout generated), CIFAR-FS and FC100 (generated
CIFAR-100 pickles), tiered-ImageNet (generated PNG pickles) and image folders: counts, standard splits,
leak-free sampled episodes, determinism, clear errors and no half-written cache."""
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.config import DataConfig
from metalearn.data import (CifarFS, EpisodeSampler, FC100, ImageFolder, MiniImageNet, TieredImageNet,
                            open_dataset)
from metalearn.errors import MetalearnError

from test_data_helpers import assert_episodes_leak_free

CIFAR100 = {  # superclass -> its five fine classes (CIFAR-100's published label structure)
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def unique_images(n: int, size: int, first: int, channels: int = 3) -> np.ndarray:
    """uint8 (n, size, size, channels), every image distinct: random noise with an id in the corner."""
    rng = np.random.default_rng(first)
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    ids = np.arange(first, first + n)
    x[:, 0, 0, 0], x[:, 0, 1, 0], x[:, 0, 2, 0] = ids % 256, (ids // 256) % 256, ids // 65536
    return x


def dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cfg(dataset, root, cache, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), cache_dir=str(cache), split=kw.pop("split", "standard"), **kw)


# --- mini-ImageNet --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_sample(data_root) -> Path:
    root = data_root / "mini-imagenet-sample"
    if not root.is_dir():
        pytest.skip("no mini-imagenet-sample under METALEARN_DATA")
    return root


def test_mini_imagenet_csv_layout_real_sample(mini_sample, tmp_path):
    ds, splits = open_dataset(cfg("mini-imagenet", mini_sample, tmp_path, image_size=84))
    assert [len(splits[k]) for k in ("train", "val", "test")] == [64, 16, 20]
    assert ds.images.shape == (100, 12, 3, 84, 84) and ds.images.dtype == torch.uint8 and ds.channels == 3
    assert ds.samples_per_class == 12 and ds.class_names[0] == "n01532829"
    first = np.asarray(Image.open(mini_sample / "images" / "n0153282900000005.jpg").convert("RGB"))
    assert torch.equal(ds.images[0, 0], torch.from_numpy(first.copy()).permute(2, 0, 1))  # decoded exactly, CSV order
    assert_episodes_leak_free(ds.images, splits, ways=5, shots=5, query_shots=5, tasks=8)
    again, _ = open_dataset(cfg("mini-imagenet", mini_sample, tmp_path, image_size=84))  # from the cache
    assert torch.equal(again.images, ds.images) and len(list(tmp_path.glob("mini-imagenet-84px-*.pt"))) == 1
    small, _ = open_dataset(cfg("mini-imagenet", mini_sample, tmp_path, image_size=32))
    assert small.images.shape == (100, 12, 3, 32, 32)


def write_mini_pickles(root: Path, classes=(6, 5, 5), per_class=7) -> None:
    first = 0
    for (split, fname), n in zip([("train", "train"), ("val", "validation"), ("test", "test")], classes):
        data = unique_images(n * per_class, 84, first)
        first += n * per_class
        order = np.random.default_rng(n).permutation(n * per_class)  # class rows interleaved, as in real files
        class_dict = {f"{split}{c:02d}": sorted(order[c * per_class:(c + 1) * per_class].tolist()) for c in range(n)}
        dump({"image_data": data, "class_dict": class_dict}, root / f"mini-imagenet-cache-{fname}.pkl")


def test_mini_imagenet_pickle_layout(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    write_mini_pickles(root)
    ds, splits = open_dataset(cfg("mini-imagenet", root, tmp_path / "cache", image_size=84))
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 5, 5]
    assert ds.images.shape == (16, 7, 3, 84, 84)
    blob = pickle.load(open(root / "mini-imagenet-cache-validation.pkl", "rb"))
    row = blob["class_dict"]["val01"][0]
    c = ds.class_names.index("val01")
    assert torch.equal(ds.images[c, 0], torch.from_numpy(blob["image_data"][row]).permute(2, 0, 1))
    assert_episodes_leak_free(ds.images, splits, ways=5, shots=2, query_shots=3, tasks=10)


def test_mini_imagenet_errors(tmp_path):
    with pytest.raises(MetalearnError, match="holds neither"):
        MiniImageNet(tmp_path, cache_dir=tmp_path / "c")
    write_mini_pickles(tmp_path)
    (tmp_path / "mini-imagenet-cache-test.pkl").write_text("<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(MetalearnError, match="mini-imagenet-cache-test.pkl is an HTML page"):
        MiniImageNet(tmp_path, cache_dir=tmp_path / "c")
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MetalearnError, match="mini-imagenet-cache-test.pkl is not a readable pickle"):
        MiniImageNet(tmp_path, cache_dir=tmp_path / "c")
    csv_root = tmp_path / "csv"
    (csv_root / "images").mkdir(parents=True)
    (csv_root / "train.csv").write_text("filename,label\nmissing.jpg,n1\n")
    (csv_root / "val.csv").write_text("filename,label\n")
    with pytest.raises(MetalearnError, match="test.csv does not exist"):
        MiniImageNet(csv_root, cache_dir=tmp_path / "c")
    (csv_root / "test.csv").write_text("filename,label\n")
    with pytest.raises(MetalearnError, match="missing.jpg"):
        MiniImageNet(csv_root, cache_dir=tmp_path / "c")


def test_a_failed_decode_leaves_no_cache(tmp_path):
    root = tmp_path / "csv"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(unique_images(1, 84, i)[0]).save(root / "images" / f"a{i}.png")
    (root / "images" / "a3.png").write_bytes(b"not a png")
    rows = "".join(f"a{i}.png,n{i % 2}\n" for i in range(4))
    (root / "train.csv").write_text("filename,label\n" + rows)
    (root / "val.csv").write_text("filename,label\n")
    (root / "test.csv").write_text("filename,label\n")
    ds = MiniImageNet(root, cache_dir=tmp_path / "cache")
    with pytest.raises(MetalearnError, match="a3.png"):
        ds.images
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- CIFAR-FS and FC100 ---------------------------------------------------------------------------
def write_cifar100(root: Path, train_per_class=3, test_per_class=1) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_names = list(CIFAR100)
    fine_names = sorted(f for fs in CIFAR100.values() for f in fs)  # the official meta lists them alphabetically
    coarse_of = {f: coarse_names.index(s) for s, fs in CIFAR100.items() for f in fs}
    dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, folder / "meta")
    first = 0
    for part, per in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per)
        np.random.default_rng(per).shuffle(fine)
        x = unique_images(len(fine), 32, first).transpose(0, 3, 1, 2).reshape(len(fine), 3072)
        first += len(fine)
        dump({"data": x, "fine_labels": fine.tolist(), "coarse_labels": [coarse_of[fine_names[f]] for f in fine]},
             folder / part)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    return root


@pytest.mark.parametrize("name,sizes", [("cifar-fs", [64, 16, 20]), ("fc100", [60, 20, 20])])
def test_cifar_fs_and_fc100_standard_splits(cifar_root, tmp_path, name, sizes):
    ds, splits = open_dataset(cfg(name, cifar_root, tmp_path, image_size=32))
    assert [len(splits[k]) for k in ("train", "val", "test")] == sizes
    assert ds.images.shape == (100, 4, 3, 32, 32) and ds.samples_per_class == 4
    names = {k: {ds.class_names[i] for i in v.tolist()} for k, v in splits.items()}
    if name == "cifar-fs":
        assert {"whale", "rocket", "baby"} <= names["test"] and {"beaver", "tractor"} <= names["val"]
    else:  # whole superclasses per split
        sup = {f: s for s, fs in CIFAR100.items() for f in fs}
        assert {sup[c] for c in names["test"]} == {"aquatic_mammals", "insects", "medium_mammals", "people"}
        assert {sup[c] for c in names["val"]} == {"large_carnivores", "large_omnivores_and_herbivores",
                                                 "non-insect_invertebrates", "small_mammals"}
    assert_episodes_leak_free(ds.images, splits, ways=5, shots=1, query_shots=2, tasks=20)


def test_cifar_decodes_the_pickle_rows_exactly(cifar_root, tmp_path):
    ds = CifarFS(cifar_root, cache_dir=tmp_path)
    blob = pickle.load(open(cifar_root / "cifar-100-python" / "train", "rb"))
    c = blob["fine_labels"][0]
    expected = torch.from_numpy(blob["data"][0].reshape(3, 32, 32))
    assert torch.equal(ds.images[c, 0], expected)
    resized = FC100(cifar_root, image_size=28, cache_dir=tmp_path)
    assert resized.images.shape == (100, 4, 3, 28, 28)


def test_cifar_errors(tmp_path):
    with pytest.raises(MetalearnError, match="meta does not exist"):
        CifarFS(tmp_path, cache_dir=tmp_path)
    write_cifar100(tmp_path)
    dump({"data": np.zeros((2, 3072), np.uint8)}, tmp_path / "cifar-100-python" / "test")
    with pytest.raises(MetalearnError, match="not a CIFAR-100 python pickle"):
        CifarFS(tmp_path, cache_dir=tmp_path)


# --- tiered-ImageNet ------------------------------------------------------------------------------
def png_bytes(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def write_tiered(root: Path, counts=((5, 6, 7, 5, 6, 8), (5, 6, 5, 5, 5), (6, 5, 5, 5, 7))) -> None:
    first = 0
    for split, per_class in zip(("train", "val", "test"), counts):
        labels = np.repeat(np.arange(len(per_class)), per_class)
        np.random.default_rng(len(labels)).shuffle(labels)
        imgs = unique_images(len(labels), 84, first)
        first += len(labels)
        dump([png_bytes(i) for i in imgs], root / f"{split}_images_png.pkl")
        dump({"label_specific": labels, "label_general": labels // 2,
              "label_specific_str": [f"{split}-class{c}" for c in range(len(per_class))]}, root / f"{split}_labels.pkl")


def test_tiered_imagenet_truncates_to_the_smallest_class_with_a_warning(tmp_path):
    write_tiered(tmp_path)
    with pytest.warns(UserWarning, match="truncated to 5"):
        ds = TieredImageNet(tmp_path, cache_dir=tmp_path / "cache")
    splits = ds.standard_split()
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 5, 5]
    assert ds.images.shape == (16, 5, 3, 84, 84) and ds.class_counts[:6] == [5, 6, 7, 5, 6, 8]
    labels = pickle.load(open(tmp_path / "val_labels.pkl", "rb"))["label_specific"]
    pngs = pickle.load(open(tmp_path / "val_images_png.pkl", "rb"))
    row = int(np.flatnonzero(labels == 2)[0])
    expected = np.asarray(Image.open(io.BytesIO(bytes(pngs[row]))).convert("RGB"))
    assert torch.equal(ds.images[ds.class_names.index("val-class2"), 0],
                       torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert_episodes_leak_free(ds.images, splits, ways=5, shots=2, query_shots=3, tasks=10)


def test_tiered_errors(tmp_path):
    write_tiered(tmp_path)
    os.remove(tmp_path / "test_images_png.pkl")
    with pytest.raises(MetalearnError, match="test_images_png.pkl does not exist"):
        TieredImageNet(tmp_path, cache_dir=tmp_path)


# --- image folder ---------------------------------------------------------------------------------
def write_folder(root: Path, classes=8, per_class=4, mode="RGB") -> None:
    imgs = unique_images(classes * per_class, 20, 0, channels=3)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            im = Image.fromarray(imgs[c * per_class + i])
            im.convert(mode).save(root / f"class{c}" / f"{i}.png")


def test_image_folder_with_split_file(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root)
    (root / "class7" / "extra.png").write_bytes((root / "class7" / "0.png").read_bytes())
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["class0", "class1", "class2"], "val": ["class3", "class4"],
                                      "test": ["class5", "class6", "class7"]}))
    with pytest.warns(UserWarning, match="truncated to 4"):
        ds, splits = open_dataset(cfg("folder", root, tmp_path / "c", split="file", image_size=20,
                                      split_file=str(split_file)))
    assert ds.images.shape == (8, 4, 3, 20, 20) and ds.channels == 3
    assert splits["val"].tolist() == [3, 4]
    expected = np.array(Image.open(root / "class2" / "1.png"))
    assert torch.equal(ds.images[2, 1], torch.from_numpy(expected).permute(2, 0, 1))
    assert_episodes_leak_free(ds.images, splits, ways=2, shots=1, query_shots=2, tasks=10)


def test_image_folder_grayscale_and_errors(tmp_path):
    root = tmp_path / "gray"
    write_folder(root, classes=3, mode="L")
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["class0"], "val": ["class1"], "test": ["class9"]}))
    ds = ImageFolder(root, image_size=10, cache_dir=tmp_path / "c", split_file=bad)
    assert ds.channels == 1 and ds.images.shape == (3, 4, 1, 10, 10)
    with pytest.raises(MetalearnError, match="class9"):
        ds.standard_split()
    bad.write_text(json.dumps({"train": ["class0", "class1"], "val": ["class1"], "test": []}))
    with pytest.raises(MetalearnError, match="both"):
        ds.standard_split()
    bad.write_text("{not json")
    with pytest.raises(MetalearnError, match="not valid JSON"):
        ds.standard_split()
    with pytest.raises(MetalearnError, match="split_file"):
        ImageFolder(root, cache_dir=tmp_path / "c").standard_split()


def test_episode_larger_than_the_split_is_one_clear_error(cifar_root, tmp_path):
    ds, splits = open_dataset(cfg("fc100", cifar_root, tmp_path, image_size=32))
    with pytest.raises(MetalearnError, match="ways=21 is more than the 20 classes in the test split"):
        EpisodeSampler(ds.images[splits["test"]], 21, 1, 1, seed=0, split="test")
    with pytest.raises(MetalearnError, match="more than the 4 examples per class"):
        EpisodeSampler(ds.images[splits["test"]], 5, 2, 3, seed=0, split="test")


def test_sampling_is_deterministic(cifar_root, tmp_path):
    ds, splits = open_dataset(cfg("cifar-fs", cifar_root, tmp_path, image_size=32))
    a = EpisodeSampler(ds.images[splits["train"]], 5, 1, 2, seed=7).sample(4)
    b = EpisodeSampler(ds.images[splits["train"]], 5, 1, 2, seed=7).sample(4)
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
