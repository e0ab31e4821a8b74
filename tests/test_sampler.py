"""Episode sampling: determinism, exact counts, disjoint support/query, labels, no split leakage."""
import pytest
import torch

from metalearn.data import EpisodeSampler, check_disjoint, fixed_episodes, omniglot_maml_split, seeded_split
from metalearn.errors import MetalearnError

from conftest import decode_ids, id_images

WAYS, SHOTS, QUERY = 5, 2, 3


def test_same_seed_same_episodes_and_different_seed_differs():
    images = id_images(50, 20)
    a = EpisodeSampler(images, WAYS, SHOTS, QUERY, seed=3).sample(8)
    b = EpisodeSampler(images, WAYS, SHOTS, QUERY, seed=3).sample(8)
    c = EpisodeSampler(images, WAYS, SHOTS, QUERY, seed=4).sample(8)
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
    assert not torch.equal(a.support.x, c.support.x)


def test_exact_counts_labels_and_disjoint_support_query():
    images = id_images(50, 20)
    batch = EpisodeSampler(images, WAYS, SHOTS, QUERY, seed=0).sample(16)
    assert batch.support.x.shape == (16, WAYS * SHOTS, 1, 2, 2) and batch.query.x.shape == (16, WAYS * QUERY, 1, 2, 2)
    assert batch.support.x.dtype == torch.float32
    for t in range(16):
        s_cls, s_idx = decode_ids(batch.support.x[t])
        q_cls, q_idx = decode_ids(batch.query.x[t])
        assert sorted(batch.support.y[t].tolist()) == sorted(list(range(WAYS)) * SHOTS)
        assert sorted(batch.query.y[t].tolist()) == sorted(list(range(WAYS)) * QUERY)
        assert len(set(s_cls.tolist())) == WAYS  # N distinct classes
        for label in range(WAYS):  # one class per label, shared by support and query
            classes = set(s_cls[batch.support.y[t] == label].tolist()) | set(q_cls[batch.query.y[t] == label].tolist())
            assert len(classes) == 1
        pairs_s = set(zip(s_cls.tolist(), s_idx.tolist()))
        pairs_q = set(zip(q_cls.tolist(), q_idx.tolist()))
        assert len(pairs_s) == WAYS * SHOTS and len(pairs_q) == WAYS * QUERY and not pairs_s & pairs_q


def test_labels_are_a_fresh_permutation_per_task():
    images = id_images(10, 20)
    batch = EpisodeSampler(images, WAYS, 1, 1, seed=0).sample(200)
    first_class = decode_ids(batch.support.x[:, 0])[0]  # class behind label 0 in each task
    assert len(set(first_class.tolist())) == 10


def test_maml_split_sizes_and_disjoint():
    splits = omniglot_maml_split(seed=1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    all_classes = torch.cat(list(splits.values()))
    assert all_classes.unique().numel() == 1623
    assert torch.equal(omniglot_maml_split(seed=1)["test"], splits["test"])
    with pytest.raises(MetalearnError, match="both"):
        check_disjoint({"train": torch.tensor([1, 2]), "test": torch.tensor([2, 3])})
    with pytest.raises(MetalearnError, match="partition"):
        seeded_split(10, [5, 6], seed=0)


def test_thousands_of_training_episodes_never_touch_val_or_test_classes():
    splits = omniglot_maml_split(seed=1)
    images = id_images(1623, 20)  # class id written into every image
    sampler = EpisodeSampler(images[splits["train"]], 20, 1, 5, seed=0)
    train = set(splits["train"].tolist())
    seen = set()
    for _ in range(100):  # 100 x 32 = 3200 episodes, 20 ways each
        batch = sampler.sample(32)
        seen |= set(decode_ids(batch.support.x)[0].unique().tolist())
        seen |= set(decode_ids(batch.query.x)[0].unique().tolist())
    assert seen <= train
    assert len(seen) > 1000  # the sampler really covers the training split


def test_fixed_episodes_independent_of_batch_size_and_enumerated():
    images = id_images(30, 20)
    a = list(fixed_episodes(images, WAYS, SHOTS, QUERY, count=10, seed=7, batch_size=3))
    b = list(fixed_episodes(images, WAYS, SHOTS, QUERY, count=10, seed=7, batch_size=10))
    assert [x.num_tasks for x in a] == [3, 3, 3, 1]
    cat = lambda bs, side: torch.cat([getattr(x, side).x for x in bs])
    assert torch.equal(cat(a, "support"), cat(b, "support")) and torch.equal(cat(a, "query"), cat(b, "query"))
    # enumerated: distinct episodes, not one episode repeated
    assert len({tuple(decode_ids(x)[0].tolist()) for x in cat(b, "support")}) == 10
    c = list(fixed_episodes(images, WAYS, SHOTS, QUERY, count=10, seed=8, batch_size=10))
    assert not torch.equal(cat(b, "support"), cat(c, "support"))


@pytest.mark.parametrize("ways,shots,query,match", [(31, 1, 1, "ways=31 is more than the 30 classes"),
                                                    (5, 5, 16, r"shots \+ query_shots = 5 \+ 16 = 21")])
def test_episode_that_does_not_fit_is_a_clear_error(ways, shots, query, match):
    with pytest.raises(MetalearnError, match=match):
        EpisodeSampler(id_images(30, 20), ways, shots, query, seed=0)
