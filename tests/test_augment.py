"""Data augmentation (metalearn/data/augment.py): each named augmentation does what its docstring says
(crop and flip against pre-training's original code, rotate and jitter against torchvision), episodes
are augmented deterministically per seed, whatever the sharding (`part`) or chunking, only in the chosen
sets and never in their labels, and a meta-training run with augmentation resumes exactly."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from metalearn.config import Augment, load_config
from metalearn.data.augment import (AUGMENTATIONS, ROTATE_DEGREES, AugmentedSampler, augment, augment_task_batch,
                                    ordered)
from metalearn.data.benchmark import synthetic_benchmark
from metalearn.data.sampler import EpisodeSampler
from metalearn.errors import MetalearnError
from metalearn.types import Examples, TaskBatch

from test_cli import QUICK

ALL = list(AUGMENTATIONS)


def old_pretrain_augment(x, kinds, g):
    """metalearn/transfer/pretrain.py's `augment` before it moved to metalearn/data/augment.py, verbatim."""
    B, C, H, W = x.shape
    if "crop" in kinds:
        pad = max(1, H // 8)
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
        x = xp[torch.arange(B, device=x.device)[:, None, None, None],
               torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    if "flip" in kinds:
        mask = (torch.rand(B, generator=g) < 0.5).to(x.device).view(B, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def images(n=12, c=1, h=16, w=16, seed=0, dtype=torch.float64):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def draw(name, x, seed=0):
    return AUGMENTATIONS[name].draw(x.shape[0], tuple(x.shape[1:]), torch.Generator().manual_seed(seed))


def apply(name, x, params):
    return AUGMENTATIONS[name].apply(x, params)


def sampler(names=("crop", "flip"), sets=("support", "query"), seed=0, rotate=False):
    pixels = torch.randint(0, 256, (12, 6, 3, 12, 12), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    inner = EpisodeSampler(pixels, 3, 2, 3, seed=seed, rotate=rotate)
    return AugmentedSampler(inner, names, sets, seed=seed) if names else inner


def same(a, b):
    return (torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
            and torch.equal(a.support.y, b.support.y) and torch.equal(a.query.y, b.query.y))


# --- the registry and the config agree ----------------------------------------------------------

def test_registry_is_the_config_choices_in_order():
    assert ALL == list(Augment.values()) == ["crop", "flip", "rotate", "jitter", "erase"]
    assert ordered(["erase", "flip", "crop", "flip"]) == ["crop", "flip", "erase"]  # a set, in registry order
    with pytest.raises(MetalearnError, match="unknown augmentation 'blur'"):
        ordered(["crop", "blur"])


# --- each augmentation does what it says -------------------------------------------------------

def test_flip_mirrors_about_half_of_the_images():
    x = images(200)
    p = draw("flip", x)
    y = apply("flip", x, p)
    for i in range(len(x)):
        assert torch.equal(y[i], x[i].flip(-1) if p["flip"][i] else x[i])
    assert 70 < int(p["flip"].sum()) < 130


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    for h, w in [(16, 16), (17, 13), (5, 5)]:  # pad = max(1, H // 8) on every side: 2, 2, 1
        x = images(40, c=3, h=h, w=w)
        p = draw("crop", x)
        y = apply("crop", x, p)
        pad = max(1, h // 8)
        xp = F.pad(x, (pad, pad, pad, pad))
        for i in range(len(x)):
            oy, ox = int(p["oy"][i]), int(p["ox"][i])
            assert 0 <= oy <= 2 * pad and 0 <= ox <= 2 * pad
            assert torch.equal(y[i], xp[i, :, oy:oy + h, ox:ox + w])
        assert len(set(zip(p["oy"].tolist(), p["ox"].tolist()))) > 5  # offsets vary


def test_rotate_is_torchvisions_bilinear_rotation_by_a_small_angle():
    x = images(30, c=3, h=15, w=15)
    p = draw("rotate", x)
    assert p["degrees"].abs().max() <= ROTATE_DEGREES and p["degrees"].std() > 3
    y = apply("rotate", x, p)
    for i in range(len(x)):
        ref = TF.rotate(x[i], float(p["degrees"][i]), interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-12)
    zero = {"degrees": torch.zeros(len(x), dtype=torch.float64)}
    torch.testing.assert_close(apply("rotate", x, zero), x, rtol=0, atol=1e-12)  # 0 degrees: the image itself


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_is_torchvisions_brightness_then_contrast(channels):
    x = images(30, c=channels, h=9, w=9)
    p = draw("jitter", x)
    for k in ("brightness", "contrast"):
        assert 0.6 <= p[k].min() and p[k].max() <= 1.4
    y = apply("jitter", x, p)
    assert 0 <= y.min() and y.max() <= 1
    for i in range(len(x)):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], float(p["brightness"][i])), float(p["contrast"][i]))
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-12)


def test_erase_zeroes_one_rectangle_inside_the_image_in_about_half_of_the_images():
    x = images(200, c=3, h=16, w=12) + 0.5  # no zero pixels of its own
    p = draw("erase", x)
    y = apply("erase", x, p)
    for i in range(len(x)):
        zero = (y[i] == 0).all(0)
        assert torch.equal(y[i][:, ~zero], x[i][:, ~zero])  # outside the rectangle: untouched
        if not p["on"][i]:
            assert not zero.any()
            continue
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        top, h, left, w = int(rows[0]), len(rows), int(cols[0]), len(cols)
        assert (top, h, left, w) == (int(p["top"][i]), int(p["h"][i]), int(p["left"][i]), int(p["w"][i]))
        assert zero.sum() == h * w and 1 <= h <= 8 and 1 <= w <= 6 and top + h <= 16 and left + w <= 12
    assert 70 < int(p["on"].sum()) < 130


def test_every_augmentation_keeps_shape_dtype_and_device_and_acts_per_image():
    x = images(10, c=3, h=12, w=12, dtype=torch.float32)
    for name in ALL:
        p = draw(name, x, seed=4)
        y = apply(name, x, p)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device, name
        part = apply(name, x[3:7], {k: v[3:7] for k, v in p.items()})
        assert torch.equal(y[3:7], part), name  # an image's result depends on itself and its parameters only


# --- pre-training: bit for bit as before ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pretraining_crop_and_flip_are_bit_identical_to_the_original(dtype):
    from metalearn.transfer.pretrain import augment as pretrain_augment

    assert pretrain_augment is augment
    for kinds in (["crop"], ["flip"], ["crop", "flip"], ["flip", "crop"], ["crop", "crop"], []):
        for shape in [(16, 1, 28, 28), (8, 3, 17, 13)]:
            x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
            g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            for _ in range(3):  # successive mini-batches: the generator advances as before too
                assert torch.equal(augment(x, kinds, g_new), old_pretrain_augment(x, kinds, g_old)), kinds
            assert torch.equal(g_new.get_state(), g_old.get_state())


# --- episodes: determinism, sharding, chosen sets, labels ---------------------------------------

def test_same_seed_same_episodes_different_seed_or_step_different():
    a, b, c = sampler(ALL, seed=0), sampler(ALL, seed=0), sampler(ALL, seed=1)
    plain = sampler(None, seed=0)
    for _ in range(3):
        x, y, z, p = a.sample(4), b.sample(4), c.sample(4), plain.sample(4)
        assert same(x, y)
        assert not torch.equal(x.support.x, z.support.x)
        assert not torch.equal(x.support.x, p.support.x) and not torch.equal(x.query.x, p.query.x)
        assert torch.equal(x.support.y, p.support.y) and torch.equal(x.query.y, p.query.y)  # labels unchanged
    # the augmentation seed alone: same episodes drawn, different augmentation
    d = AugmentedSampler(EpisodeSampler(sampler(None).images, 3, 2, 3, seed=0), ALL, ["support", "query"], seed=9)
    e = sampler(ALL, seed=0)
    assert not torch.equal(d.sample(4).query.x, e.sample(4).query.x)
    # successive meta-batches get fresh parameters even for identical images
    one = augment_task_batch(p, ALL, ["support"], seed=0, index=0)
    two = augment_task_batch(p, ALL, ["support"], seed=0, index=1)
    assert not torch.equal(one.support.x, two.support.x)


def test_episodes_do_not_depend_on_sharding_or_chunking():
    T = 7
    whole = sampler(ALL, rotate=True)
    shards = [sampler(ALL, rotate=True) for _ in range(3)]
    for _ in range(2):
        full = whole.sample(T)
        parts = [s.sample(T, part=sl) for s, sl in zip(shards, [slice(0, 3), slice(3, 5), slice(5, 7)])]
        for side in ("support", "query"):
            for k in ("x", "y"):
                cat = torch.cat([getattr(getattr(p, side), k) for p in parts])
                assert torch.equal(getattr(getattr(full, side), k), cat), (side, k)
    # chunks: augmenting tasks 2..4 alone (with their global indices) gives those tasks of the whole batch
    raw = sampler(None).sample(T)
    full = augment_task_batch(raw, ALL, ["support", "query"], seed=3, index=5)
    for lo, hi in [(2, 5), (0, 1), (6, 7)]:
        chunk = TaskBatch(Examples(raw.support.x[lo:hi], raw.support.y[lo:hi]),
                          Examples(raw.query.x[lo:hi], raw.query.y[lo:hi]), raw.ways, raw.shots, raw.query_shots)
        got = augment_task_batch(chunk, ALL, ["support", "query"], seed=3, index=5, tasks=range(lo, hi))
        assert torch.equal(got.support.x, full.support.x[lo:hi]) and torch.equal(got.query.x, full.query.x[lo:hi])


@pytest.mark.parametrize("sets", [["support"], ["query"]])
def test_only_the_chosen_set_is_augmented(sets):
    raw = sampler(None).sample(5)
    both = augment_task_batch(raw, ALL, ["support", "query"], seed=0, index=0)
    one = augment_task_batch(raw, ALL, sets, seed=0, index=0)
    other = "query" if sets == ["support"] else "support"
    chosen = sets[0]
    assert torch.equal(getattr(one, other).x, getattr(raw, other).x)  # untouched
    assert torch.equal(getattr(one, chosen).x, getattr(both, chosen).x)  # as when both sets are augmented
    assert not torch.equal(getattr(one, chosen).x, getattr(raw, chosen).x)
    for side in ("support", "query"):
        assert torch.equal(getattr(one, side).y, getattr(raw, side).y)
    assert (one.ways, one.shots, one.query_shots) == (raw.ways, raw.shots, raw.query_shots)


def test_sampler_state_resumes_the_augmented_stream_exactly():
    a = sampler(ALL)
    a.sample(4), a.sample(4)
    state = a.state_dict()
    assert state["augment_batches"] == 2 and "generator" in state
    ahead = [a.sample(4) for _ in range(3)]
    b = AugmentedSampler(EpisodeSampler(a.sampler.images, 3, 2, 3, seed=123), ALL, ["support", "query"], seed=0)
    b.load_state_dict(state)  # the seed comes from the config; the state restores the episodes and the counter
    assert all(same(x, y) for x, y in zip(ahead, [b.sample(4) for _ in range(3)]))
    with pytest.raises(MetalearnError, match="without data.augment"):
        sampler(ALL).load_state_dict(sampler(None).state_dict())


def test_benchmark_augments_training_episodes_only():
    base = ["data.image_size=16", "data.ways=3", "data.shots=1", "data.query_shots=2"]
    plain = synthetic_benchmark(load_config(QUICK, base))
    aug = synthetic_benchmark(load_config(QUICK, [*base, "data.augment=[crop,erase]", "data.augment_sets=[query]"]))
    for b in (plain, aug):
        b.load(torch.device("cpu"))
    s, t = plain.sampler(0, torch.float32), aug.sampler(0, torch.float32)
    assert isinstance(t, AugmentedSampler) and t.names == ["crop", "erase"] and t.sets == ["query"]
    x, y = s.sample(4), t.sample(4)
    assert torch.equal(x.support.x, y.support.x) and not torch.equal(x.query.x, y.query.x)
    kw = dict(ways=3, shots=1, query_shots=2, count=4, seed=0, batch_size=4, dtype=torch.float32)
    for split in ("val", "test"):
        assert all(same(e, f) for e, f in zip(plain.episodes(split, **kw), aug.episodes(split, **kw)))


def test_bad_combinations_are_one_line_errors():
    sinusoid = str(QUICK.parent / "maml_sinusoid.yaml")
    with pytest.raises(MetalearnError, match="data.augment augments images; sinusoid"):
        load_config(sinusoid, ["data.augment=[flip]"])
    with pytest.raises(MetalearnError, match="data.augment_sets is empty"):
        load_config(QUICK, ["data.augment=[crop]", "data.augment_sets=[]"])
    load_config(QUICK, ["data.augment=[]", "data.augment_sets=[]"])  # nothing to augment: fine
    with pytest.raises(MetalearnError, match="augment"):
        load_config(QUICK, ["data.augment=[solarize]"])
    with pytest.raises(MetalearnError, match="augment_sets"):
        load_config(QUICK, ["data.augment_sets=[train]"])
    from metalearn.transfer.pretrain import check_pretrain_data

    with pytest.raises(MetalearnError, match="transfer.pretrain.augment"):
        check_pretrain_data(load_config(QUICK, ["data.augment=[crop]"]))


# --- a meta-training run with augmentation resumes exactly ---------------------------------------

def test_training_with_augmentation_resumes_bit_identically(tmp_path, data_root, cache_dir, monkeypatch):
    """A run that dies at step 6 (after its checkpoint at step 4, as after a SIGKILL) and is resumed ends
    with the parameters, optimiser state, sampler state and logged losses of a run never interrupted."""
    from metalearn.checkpoint import load_checkpoint
    from metalearn.tracking import read_jsonl
    from metalearn.train import train

    def cfg(name):
        return load_config(QUICK, [
            f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}", "model.hidden=4",
            "outer.meta_batch_size=2", "outer.iterations=8", "checkpoint.every=4", "data.query_shots=2",
            "data.augment=[crop,rotate,jitter,erase]", "eval.episodes=2", "eval.query_shots=2", "eval.batch_size=2",
            "tracking.log_every=1", "tracking.progress=false", "threads=1",
            f"tracking.out_dir={tmp_path}", f"tracking.name={name}"])

    whole = train(cfg("whole"))
    original = AugmentedSampler.sample

    def dies_at_step_6(self, *args, **kwargs):
        if self.batches == 5:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AugmentedSampler, "sample", dies_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg("cut"))
    monkeypatch.setattr(AugmentedSampler, "sample", original)
    assert load_checkpoint(tmp_path / "cut")["step"] == 4
    resumed = train(cfg("cut"), resume=True)
    assert resumed["step"] == whole["step"] == 8
    a, b = load_checkpoint(tmp_path / "cut"), load_checkpoint(tmp_path / "whole")
    assert a["sampler"]["augment_batches"] == b["sampler"]["augment_batches"] == 8
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(a["optimizer"]["state"][i][key], value), (i, key)
    losses = lambda run: [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl")
                          if "train/loss" in r]
    assert losses("cut") == losses("whole") and len(losses("whole")) == 8
    assert all(math.isfinite(v) for _, v in losses("whole"))
    assert whole["eval"]["accuracies"] == resumed["eval"]["accuracies"]
