"""Rotations: the vectorised per-class rotation equals torch.rot90 per class; the sampler rotates all
images of a class in a task alike; the 4x class pool keeps splits disjoint."""
import torch

from metalearn.data import EpisodeSampler, RotatedClasses, fixed_episodes
from metalearn.data.rotation import rotate_per_class, rotate_per_class_reference


def pattern_images(num_classes: int, per_class: int, size: int = 4) -> torch.Tensor:
    """uint8 (classes, per_class, 1, S, S): pixel (0, 0) = class, (0, 1) = sample, the rest 0 except (1, 0) = 200.
    Every rotation of such an image is distinguishable (the corner markers move)."""
    img = torch.zeros(num_classes, per_class, 1, size, size, dtype=torch.uint8)
    img[:, :, 0, 0, 0] = torch.arange(num_classes, dtype=torch.uint8).view(-1, 1)
    img[:, :, 0, 0, 1] = torch.arange(per_class, dtype=torch.uint8).view(1, -1)
    img[:, :, 0, 1, 0] = 200
    return img


def unrotate(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(1, S, S) float image -> (quarter turns k applied, the unrotated uint8 image)."""
    u = (x * 255).round().to(torch.uint8)
    for k in range(4):
        back = torch.rot90(u, -k, dims=(-2, -1))
        if back[0, 1, 0] == 200:
            return k, back
    raise AssertionError("no rotation matches")


def test_fast_rotation_matches_reference():
    g = torch.Generator().manual_seed(0)
    picked = torch.randint(0, 256, (3, 5, 4, 2, 6, 6), generator=g, dtype=torch.uint8)
    turns = torch.randint(0, 4, (3, 5), generator=g)
    assert torch.equal(rotate_per_class(picked, turns), rotate_per_class_reference(picked, turns))


def test_sampler_rotates_each_class_of_a_task_alike_and_all_angles_occur():
    images = pattern_images(20, 10)
    batch = EpisodeSampler(images, 5, 2, 3, seed=0, rotate=True).sample(64)
    seen = set()
    for t in range(64):
        for label in range(5):
            xs = torch.cat([batch.support.x[t][batch.support.y[t] == label],
                            batch.query.x[t][batch.query.y[t] == label]])
            ks = {unrotate(x)[0] for x in xs}
            assert len(ks) == 1  # one rotation per class per task
            seen |= ks
            cls = {int(unrotate(x)[1][0, 0, 0]) for x in xs}
            assert len(cls) == 1
    assert seen == {0, 1, 2, 3}
    plain = EpisodeSampler(images, 5, 2, 3, seed=0).sample(8)
    assert all(unrotate(x)[0] == 0 for x in plain.support.x.flatten(0, 1))


def test_fixed_episodes_with_rotation_are_deterministic():
    images = pattern_images(20, 10)
    a = torch.cat([b.query.x for b in fixed_episodes(images, 5, 1, 2, count=10, seed=3, batch_size=10, rotate=True)])
    b = torch.cat([b.query.x for b in fixed_episodes(images, 5, 1, 2, count=10, seed=3, batch_size=3, rotate=True)])
    assert torch.equal(a, b)
    assert {unrotate(x)[0] for x in a.flatten(0, 1)} == {0, 1, 2, 3}


class _Tiny:
    name, channels, samples_per_class = "tiny", 1, 10

    def __init__(self):
        self.images = pattern_images(12, 10)
        self.class_names = [f"c{i}" for i in range(12)]


def test_rotated_class_pool_is_4x_for_chosen_splits_and_disjoint():
    rot = RotatedClasses(_Tiny())
    base = {"train": torch.arange(0, 6), "val": torch.arange(6, 8), "test": torch.arange(8, 12)}
    splits = rot.split(base, ["train", "test"])
    assert [len(splits[k]) for k in ("train", "val", "test")] == [24, 2, 16]
    assert rot.images.shape == (48, 10, 1, 4, 4) and len(rot.class_names) == 48
    for name, idx in splits.items():
        for c in idx.tolist():  # pool class c is base class c % 12 rotated by 90 * (c // 12)
            k, back = unrotate(rot.images[c, 0].float() / 255)
            assert k == c // 12 and int(back[0, 0, 0]) in base[name].tolist()
    all_idx = torch.cat(list(splits.values()))
    assert all_idx.unique().numel() == all_idx.numel()
    # sampled training episodes of the rotated pool only ever show train characters
    batch = EpisodeSampler(rot.images[splits["train"]], 5, 1, 1, seed=0).sample(200)
    classes = {int(unrotate(x)[1][0, 0, 0]) for x in batch.support.x.flatten(0, 1)}
    assert classes == set(range(6))
