"""Split files are checked, not trusted: every split source refuses a class or source file in two splits, a
class with no images, an unknown class and a duplicated line with one line naming the file and the first
offending class or image (small generated fixtures); pixel-identical images across splits are one warning
with the count; `metalearn data check` prints per split classes, images and overlaps (real Omniglot)."""
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import metalearn.data.cifar as cifar
from metalearn.cli import main
from metalearn.config import load_config
from metalearn.data import CifarFS, FC100, ImageFolder, MiniImageNet, Omniglot, TieredImageNet, open_dataset
from metalearn.data.checks import cached_hashes, check_class_lists, identical_across_splits, image_hashes
from metalearn.errors import MetalearnError

from test_data_datasets import cfg, dump, unique_images, write_cifar100, write_folder, write_mini_pickles, write_tiered

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "experiments" / "configs" / "omniglot_5w1s_quick.yaml"


def refused(match, fn, *args, **kw):
    """fn(*args, **kw) raises one single-line MetalearnError containing every string in `match`."""
    with pytest.raises(MetalearnError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in [match] if isinstance(match, str) else match:
        assert m in msg, msg
    return msg


# --- the shared rule ------------------------------------------------------------------------------
def test_check_class_lists_rules():
    src = {"train": "a.txt", "val": "b.txt", "test": "c.txt"}
    ok = {"train": ["x", "y"], "val": ["z"], "test": []}
    check_class_lists("d", ok, src, known={"x", "y", "z"}, counts={"x": 1, "y": 2, "z": 3})
    refused(["a.txt", "'x'", "twice"], check_class_lists, "d", {**ok, "train": ["x", "y", "x"]}, src)
    refused(["'y'", "both", "a.txt", "c.txt"], check_class_lists, "d", {**ok, "test": ["y"]}, src)
    refused(["b.txt", "'z'", "not in the data"], check_class_lists, "d", ok, src, known={"x", "y"})
    refused(["'y'", "a.txt", "no images"], check_class_lists, "d", ok, src, counts={"x": 1, "y": 0, "z": 1})


# --- mini-ImageNet, CSV layout --------------------------------------------------------------------
def write_csv_layout(root: Path, splits: dict) -> None:
    """splits: split -> [(filename, label)] rows; every distinct filename becomes a distinct image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = sorted({f for rows in splits.values() for f, _ in rows})
    for i, f in enumerate(files):
        Image.fromarray(unique_images(1, 8, i)[0]).save(root / "images" / f)
    for split in ("train", "val", "test"):
        lines = "".join(f"{f},{c}\n" for f, c in splits.get(split, []))
        (root / f"{split}.csv").write_text("filename,label\n" + lines)


def clean_csv_rows() -> dict:
    return {s: [(f"{s}{c}_{i}.png", f"{s}{c}") for c in range(2) for i in range(3)] for s in ("train", "val", "test")}


def test_mini_imagenet_csv_clean_split_accepted(tmp_path):
    write_csv_layout(tmp_path / "m", clean_csv_rows())
    ds, splits = open_dataset(cfg("mini-imagenet", tmp_path / "m", tmp_path / "c", image_size=8))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 2, 2] and ds.samples_per_class == 3


def test_mini_imagenet_csv_image_in_two_splits(tmp_path):
    rows = clean_csv_rows()
    rows["test"].append(("train0_1.png", "test0"))  # a training image also listed as a test image
    write_csv_layout(tmp_path / "m", rows)
    refused(["image 'train0_1.png'", "train.csv line 3", "test.csv line 8"], MiniImageNet, tmp_path / "m",
            cache_dir=tmp_path / "c")


def test_mini_imagenet_csv_class_in_two_splits(tmp_path):
    rows = clean_csv_rows()
    rows["test"] += [("extra0.png", "train1"), ("extra1.png", "train1")]  # silently merged into train before
    write_csv_layout(tmp_path / "m", rows)
    refused(["class 'train1'", "both", "train.csv (line 5)", "test.csv (line 8)"], MiniImageNet, tmp_path / "m",
            cache_dir=tmp_path / "c")


def test_mini_imagenet_csv_duplicated_line_and_image_in_two_classes(tmp_path):
    rows = clean_csv_rows()
    rows["val"].insert(2, rows["val"][0])
    write_csv_layout(tmp_path / "m", rows)
    refused(["val.csv line 4 duplicates line 2", "'val0_0.png'"], MiniImageNet, tmp_path / "m",
            cache_dir=tmp_path / "c")
    rows = clean_csv_rows()
    rows["val"].append(("val0_0.png", "val1"))
    write_csv_layout(tmp_path / "m2", rows)
    refused(["image 'val0_0.png'", "class 'val0'", "class 'val1'"], MiniImageNet, tmp_path / "m2",
            cache_dir=tmp_path / "c")


# --- mini-ImageNet, pickle layout -----------------------------------------------------------------
def edit_pickle(path: Path, edit) -> None:
    blob = pickle.load(open(path, "rb"))
    edit(blob["class_dict"])
    dump(blob, path)


@pytest.mark.parametrize("case", ["class in two splits", "no images", "row twice", "row in two classes"])
def test_mini_imagenet_pickles(tmp_path, case):
    write_mini_pickles(tmp_path)
    MiniImageNet(tmp_path, cache_dir=tmp_path / "c").standard_split()  # clean: accepted
    test = tmp_path / "mini-imagenet-cache-test.pkl"
    if case == "class in two splits":
        edit_pickle(test, lambda d: d.update(train03=d.pop("test03")))
        match = ["class 'train03'", "both", "mini-imagenet-cache-train.pkl", "mini-imagenet-cache-test.pkl"]
    elif case == "no images":
        edit_pickle(test, lambda d: d.update(test02=[]))
        match = ["class 'test02'", "mini-imagenet-cache-test.pkl", "no images"]
    elif case == "row twice":
        edit_pickle(test, lambda d: d["test01"].append(d["test01"][0]))
        match = ["mini-imagenet-cache-test.pkl", "class 'test01'", "twice"]
    else:
        edit_pickle(test, lambda d: d["test01"].append(d["test00"][0]))
        match = ["mini-imagenet-cache-test.pkl", "class 'test01'", "class 'test00'"]
    refused(match, MiniImageNet, tmp_path, cache_dir=tmp_path / "c")


# --- tiered-ImageNet ------------------------------------------------------------------------------
def edit_labels(path: Path, edit) -> None:
    blob = pickle.load(open(path, "rb"))
    edit(blob)
    dump(blob, path)


@pytest.mark.parametrize("case", ["class in two splits", "duplicated name", "unknown label", "no images"])
def test_tiered_imagenet_label_files(tmp_path, case):
    write_tiered(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unequal class sizes
        TieredImageNet(tmp_path, cache_dir=tmp_path / "c").standard_split()  # clean: accepted
    test = tmp_path / "test_labels.pkl"
    if case == "class in two splits":
        edit_labels(test, lambda b: b["label_specific_str"].__setitem__(1, "train-class4"))
        match = ["class 'train-class4'", "both", "train_labels.pkl", "test_labels.pkl"]
    elif case == "duplicated name":
        edit_labels(test, lambda b: b["label_specific_str"].__setitem__(3, "test-class0"))
        match = ["test_labels.pkl", "class 'test-class0'", "twice"]
    elif case == "unknown label":
        edit_labels(test, lambda b: b.update(label_specific_str=b["label_specific_str"][:-1]))
        match = ["test_labels.pkl", "label 4 has no name"]
    else:
        edit_labels(test, lambda b: b["label_specific_str"].append("test-class9"))
        match = ["class 'test-class9'", "test_labels.pkl", "no images"]
    refused(match, TieredImageNet, tmp_path, cache_dir=tmp_path / "c")


# --- CIFAR-FS and FC100 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    return root


def test_cifar_fs_class_lists(cifar_root, tmp_path, monkeypatch):
    CifarFS(cifar_root, cache_dir=tmp_path).standard_split()  # clean: accepted
    monkeypatch.setattr(cifar, "CIFAR_FS_TEST", cifar.CIFAR_FS_TEST[:-1] + ("beaver",))  # a val class
    refused(["class 'beaver'", "both", "CIFAR_FS_VAL", "CIFAR_FS_TEST"],
            CifarFS(cifar_root, cache_dir=tmp_path).standard_split)
    monkeypatch.setattr(cifar, "CIFAR_FS_TEST", cifar.CIFAR_FS_TEST[:-1] + ("unicorn",))
    refused(["CIFAR_FS_TEST", "class 'unicorn'", "not in the data"],
            CifarFS(cifar_root, cache_dir=tmp_path).standard_split)
    monkeypatch.setattr(cifar, "CIFAR_FS_VAL", cifar.CIFAR_FS_VAL + ("otter",))
    refused(["CIFAR_FS_VAL", "class 'otter'", "twice"], CifarFS(cifar_root, cache_dir=tmp_path).standard_split)


def test_fc100_superclass_lists(cifar_root, tmp_path, monkeypatch):
    FC100(cifar_root, cache_dir=tmp_path).standard_split()
    monkeypatch.setattr(cifar, "FC100_TEST", cifar.FC100_TEST[:-1] + ("small_mammals",))  # a val superclass
    refused(["'small_mammals'", "both", "FC100_VAL", "FC100_TEST"],
            FC100(cifar_root, cache_dir=tmp_path).standard_split)


def test_cifar_meta_and_empty_class(tmp_path):
    write_cifar100(tmp_path / "a")
    meta = tmp_path / "a" / "cifar-100-python" / "meta"
    blob = pickle.load(open(meta, "rb"))
    names = blob["fine_label_names"]
    dump({**blob, "fine_label_names": names[:-1] + [names[0]]}, meta)  # a duplicated line in meta
    refused([str(meta), f"class {names[0]!r}", "twice"], CifarFS, tmp_path / "a", cache_dir=tmp_path / "c")
    write_cifar100(tmp_path / "b", train_per_class=1, test_per_class=0)
    train = tmp_path / "b" / "cifar-100-python" / "train"
    blob = pickle.load(open(train, "rb"))
    keep = [i for i, f in enumerate(blob["fine_labels"]) if f != 7]  # fine class 7 loses its only image
    dump({"data": blob["data"][keep], "fine_labels": [blob["fine_labels"][i] for i in keep],
          "coarse_labels": [blob["coarse_labels"][i] for i in keep]}, train)
    name = pickle.load(open(tmp_path / "b" / "cifar-100-python" / "meta", "rb"))["fine_label_names"][7]
    refused([f"class {name!r}", "no images in", str(train)], CifarFS, tmp_path / "b", cache_dir=tmp_path / "c")


# --- image folder + JSON split file ---------------------------------------------------------------
CLEAN = {"train": ["class0", "class1", "class2"], "val": ["class3", "class4"], "test": ["class5", "class6"]}


def folder_split(tmp_path, spec, text=None):
    root = tmp_path / "imgs"
    if not root.exists():
        write_folder(root, classes=7)
    split_file = tmp_path / "split.json"
    split_file.write_text(text if text is not None else json.dumps(spec))
    return ImageFolder(root, image_size=20, cache_dir=tmp_path / "c", split_file=split_file), split_file


def test_folder_clean_split_accepted(tmp_path):
    ds, _ = folder_split(tmp_path, CLEAN)
    assert ds.standard_split()["val"].tolist() == [3, 4]


@pytest.mark.parametrize("case", ["class in two splits", "listed twice", "unknown class", "repeated key", "not a name"])
def test_folder_split_file(tmp_path, case):
    spec = {k: list(v) for k, v in CLEAN.items()}
    text = None
    if case == "class in two splits":
        spec["test"].append("class1")
        match = ["class 'class1' is in both the train and the test split"]
    elif case == "listed twice":
        spec["val"].append("class3")
        match = ["class 'class3'", "twice"]
    elif case == "unknown class":
        spec["test"].append("class9")
        match = ["class 'class9'", "not in the data"]
    elif case == "repeated key":
        text = '{"train": ["class0"], "val": ["class3"], "test": ["class5"], "train": ["class1"]}'
        match = ["'train' twice"]
    else:
        spec["train"].append(3)
        match = ["the train list holds 3"]
    ds, split_file = folder_split(tmp_path, spec, text)
    refused([str(split_file), *match], ds.standard_split)


def test_folder_class_without_images(tmp_path):
    write_folder(tmp_path / "imgs", classes=7)
    (tmp_path / "imgs" / "class9").mkdir()
    refused(["class 'class9'", str(tmp_path / "imgs" / "class9"), "no"], ImageFolder, tmp_path / "imgs",
            cache_dir=tmp_path / "c")


@pytest.mark.filterwarnings("ignore:folder. classes have")  # the link is a 5th image of its class
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_folder_same_file_in_two_splits(tmp_path, link):
    write_folder(tmp_path / "imgs", classes=7)
    target, alias = tmp_path / "imgs" / "class0" / "1.png", tmp_path / "imgs" / "class6" / "9.png"
    alias.symlink_to(target) if link == "symlink" else os.link(target, alias)
    ds, split_file = folder_split(tmp_path, CLEAN)
    refused([str(alias), "(test)", "same file as", str(target), "(train)", str(split_file)], ds.standard_split)


# --- Omniglot's archives --------------------------------------------------------------------------
def write_omniglot(root: Path, alphabets) -> None:
    """Two tiny official-layout zips: part -> [alphabets], 2 characters of 20 drawings each."""
    root.mkdir(parents=True, exist_ok=True)
    for part, names in alphabets.items():
        with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
            for a in names:
                for c in (1, 2):
                    for d in range(20):
                        buf = io.BytesIO()
                        Image.fromarray(unique_images(1, 8, d, channels=1)[0, ..., 0]).save(buf, format="PNG")
                        zf.writestr(f"{part}/{a}/character{c:02d}/{d:04d}.png", buf.getvalue())


def test_omniglot_duplicated_member(tmp_path):
    write_omniglot(tmp_path / "o", {"images_background": ["Latin"], "images_evaluation": ["Greek"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        with zipfile.ZipFile(tmp_path / "o" / "images_evaluation.zip", "a") as zf:
            zf.writestr("images_evaluation/Greek/character01/0003.png", b"x")
    refused(["images_evaluation.zip", "images_evaluation/Greek/character01/0003.png twice"], Omniglot, tmp_path / "o",
            expected_characters=None)


# --- pixel-identical images across splits ---------------------------------------------------------
def test_pixel_identical_images_are_one_warning_with_the_count(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root, classes=7)
    for i in (0, 1):  # copies (not links: different files) of two training images in a test class
        (root / "class5" / f"{i}.png").write_bytes((root / "class0" / f"{i}.png").read_bytes())
    (tmp_path / "split.json").write_text(json.dumps(CLEAN))
    ds, splits = open_dataset(cfg("folder", root, tmp_path / "c", split="file", image_size=20,
                                  split_file=str(tmp_path / "split.json")))
    with pytest.warns(UserWarning) as record:
        ds.images
    msgs = [str(w.message) for w in record if "pixel-identical" in str(w.message)]
    assert len(msgs) == 1 and "pixel-identical to an image of another split: 4 (train 2, test 2)" in msgs[0], msgs
    assert "'class0' image 0 (train)" in msgs[0] and "'class5' image 0 (test)" in msgs[0]
    counts, _ = identical_across_splits(image_hashes(ds.images), splits)
    assert counts == {"train": 2, "val": 0, "test": 2}


def test_hashes_are_computed_once_beside_the_cache(tmp_path, monkeypatch):
    images = torch.from_numpy(unique_images(6, 4, 0)).permute(0, 3, 1, 2).reshape(3, 2, 3, 4, 4).contiguous()
    images[2, 1] = images[0, 0]
    cache = tmp_path / "folder-4px-0123456789abcdef0123.pt"
    h = cached_hashes(images, cache)
    assert cache.with_suffix(".hashes").is_file() and torch.equal(h, image_hashes(images))
    monkeypatch.setattr("metalearn.data.checks.image_hashes", lambda x: pytest.fail("hashed twice"))
    assert torch.equal(cached_hashes(images, cache), h)
    counts, example = identical_across_splits(h, {"train": torch.tensor([0, 1]), "test": torch.tensor([2])})
    assert counts == {"train": 1, "test": 1} and example == (("train", 0, 0), ("test", 2, 1))


# --- refused before any work; the command; evaluation results -------------------------------------
def test_overlapping_split_stops_training_before_anything_is_written(tmp_path):
    rows = clean_csv_rows()
    rows["test"].append(("train0_1.png", "test0"))
    write_csv_layout(tmp_path / "m", rows)
    env = {**os.environ, "METALEARN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "metalearn", "train", str(QUICK), "data.dataset=mini-imagenet",
                           "data.split=standard", f"data.root={tmp_path / 'm'}",
                           f"tracking.out_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: mini-imagenet: image 'train0_1.png'"), proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_data_check_command_on_generated_data(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_folder(root, classes=7)
    (root / "class5" / "0.png").write_bytes((root / "class0" / "0.png").read_bytes())
    (tmp_path / "split.json").write_text(json.dumps(CLEAN))
    args = ["data", "check", "folder", f"root={root}", f"split_file={tmp_path / 'split.json'}", "image_size=20",
            f"cache_dir={tmp_path / 'c'}"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["split", "classes", "images", "shared", "classes", "shared", "files", "identical",
                              "images"]
    assert out[2].split() == ["train", "3", "12", "0", "0", "1"]
    assert out[4].split() == ["test", "2", "8", "0", "0", "1"]
    assert ("pixel-identical images across splits: 2, e.g. 'class0' image 0 (train) and 'class5' image 0 (test)"
            in out[5])
    (tmp_path / "split.json").write_text(json.dumps({**CLEAN, "test": ["class5", "class0"]}))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metalearn: error: folder: ") and \
        "class 'class0' is in both the train and the test split" in err[0]


def test_data_check_command_on_real_omniglot(data_root, cache_dir, omniglot, capsys):
    omniglot.images  # decoded once per session (shared with test_omniglot), so the pixel check only loads it
    assert main(["data", "check", "omniglot", f"root={data_root / 'omniglot'}", f"cache_dir={cache_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"omniglot, split maml, 28 px: {data_root / 'omniglot'}"
    assert [r.split() for r in out[2:5]] == [["train", "1,100", "22,000", "0", "0", "0"],
                                             ["val", "100", "2,000", "0", "0", "0"],
                                             ["test", "423", "8,460", "0", "0", "0"]]
    assert out[5] == "ok: no class or source file in more than one split; no pixel-identical images across splits"
    assert main(["data", "check", "omniglot", "split=lake", f"root={data_root / 'omniglot'}", f"cache_dir={cache_dir}",
                 "--no-pixels"]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()[2:5]]
    assert rows == [["train", "964", "19,280", "0", "0", "-"], ["val", "0", "0", "0", "0", "-"],
                    ["test", "659", "13,180", "0", "0", "-"]]


def test_evaluation_results_record_threads_and_execution_path():
    from metalearn.algorithms import MAML
    from metalearn.engine import Engine
    from metalearn.models import Conv4
    from metalearn.train import eval_runtime

    hybrid = Engine(MAML(Conv4(hidden=8), inner_lr=0.1, inner_steps=1), "hybrid")
    assert hybrid.plan() == ("hybrid", "support sets batched, query sets one task at a time")
    c = load_config(None, [])
    assert eval_runtime(c, hybrid) == {"threads": torch.get_num_threads(), "execution": "hybrid"}
    from metalearn.algorithms import ProtoNet

    assert eval_runtime(c, Engine(ProtoNet(Conv4(hidden=8)), "hybrid"))["execution"] == "loop"  # its own per-task step
    c.eval.transductive = False  # each query example scored on its own: always the loop
    assert eval_runtime(c, hybrid)["execution"] == "loop"
