"""Helpers for the data tests (no tests here): prove on sampled episodes that a split only shows its own classes."""
import torch

from metalearn.data import EpisodeSampler, fixed_episodes


def class_lookup(images: torch.Tensor) -> dict:
    """image bytes -> set of classes holding that exact image. images uint8 (classes, per_class, C, H, W)."""
    flat = images.flatten(2).numpy()
    out: dict = {}
    for c in range(flat.shape[0]):
        for p in range(flat.shape[1]):
            out.setdefault(flat[c, p].tobytes(), set()).add(c)
    return out


def assert_episodes_leak_free(images: torch.Tensor, splits: dict, ways: int = 5, shots: int = 1, query_shots: int = 1,
                              tasks: int = 40) -> None:
    """Sample training-style and fixed evaluation episodes from every split with >= ways classes and check
    that every image shown comes from a class of that split (and that classes of a task differ)."""
    lookup = class_lookup(images)
    assert sum(len(v) for v in splits.values()) == torch.cat(list(splits.values())).unique().numel()  # disjoint
    for name, idx in splits.items():
        if len(idx) < ways:
            continue
        allowed = set(idx.tolist())
        sub = images[idx]
        batches = [EpisodeSampler(sub, ways, shots, query_shots, seed=0, split=name).sample(tasks),
                   *fixed_episodes(sub, ways, shots, query_shots, count=tasks, seed=0, batch_size=tasks, split=name)]
        for batch in batches:
            for side in (batch.support, batch.query):
                x = (side.x * 255).round().to(torch.uint8).flatten(2).numpy()
                for t in range(x.shape[0]):
                    for i in range(x.shape[1]):
                        owners = lookup[x[t, i].tobytes()]
                        assert owners <= allowed, f"{name} episode shows classes {owners - allowed} of another split"
