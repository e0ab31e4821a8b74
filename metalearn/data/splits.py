"""Class splits. Train, validation and test classes are disjoint by construction and checked."""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..errors import MetalearnError


def seeded_split(num_classes: int, sizes: Sequence[int], seed: int,
                 names: Sequence[str] = ("train", "val", "test")) -> Dict[str, torch.Tensor]:
    """A seeded random permutation of the classes cut into consecutive pieces.

    The last split takes the remainder when sum(sizes) < num_classes is given with one size
    fewer than names. Returns split name -> sorted int64 class indices.
    """
    sizes = list(sizes)
    if len(sizes) == len(names) - 1:
        sizes.append(num_classes - sum(sizes))
    if len(sizes) != len(names) or sum(sizes) != num_classes or min(sizes) <= 0:
        raise MetalearnError(f"split sizes {sizes} do not partition {num_classes} classes")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_classes, generator=g)
    out, start = {}, 0
    for name, n in zip(names, sizes):
        out[name] = perm[start:start + n].sort().values
        start += n
    check_disjoint(out)
    return out


def check_disjoint(splits: Dict[str, torch.Tensor]) -> None:
    seen: Dict[int, str] = {}
    for name, idx in splits.items():
        for c in idx.tolist():
            if c in seen:
                raise MetalearnError(f"class {c} is in both the {seen[c]} and the {name} split")
            seen[c] = name


def omniglot_maml_split(seed: int = 1) -> Dict[str, torch.Tensor]:
    """MAML's Omniglot protocol: 1200 characters for meta-training (1100 train + 100 val), 423 for test.

    Like MAML's code (random.seed(1); shuffle; cut), but the shuffle is torch's, so the exact
    characters differ from MAML's.
    """
    return seeded_split(1623, [1100, 100, 423], seed)


# Vinyals et al. (2016) "Matching Networks for One Shot Learning" split of Omniglot, as used by
# Prototypical Networks (Snell et al., 2017) and torchmeta: 1028 train / 172 val / 423 test
# characters. Validation = five whole background alphabets; test = twelve whole evaluation
# alphabets plus Gurmukhi characters 42-45; train = every other character.
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = ("Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
                          "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG")
VINYALS_TEST_EXTRA = tuple(f"images_evaluation/Gurmukhi/character{i}" for i in (42, 43, 44, 45))


def _named_split(class_names: Sequence[str], assign, what: str, sizes: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Split classes by a function name -> split name; checks the expected sizes (train, val, test)."""
    out: Dict[str, list] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(class_names):
        out[assign(name)].append(i)
    got = [len(out[k]) for k in ("train", "val", "test")]
    if got != list(sizes):
        raise MetalearnError(f"{what}: expected {sizes[0]}/{sizes[1]}/{sizes[2]} train/val/test classes, "
                             f"found {got[0]}/{got[1]}/{got[2]} "
                             f"(are all 1623 characters present with their official names?)")
    splits = {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
    check_disjoint(splits)
    return splits


def omniglot_vinyals_split(class_names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Vinyals et al.'s 1028/172/423 characters. class_names: 'images_<part>/<Alphabet>/characterNN'."""
    def assign(name: str) -> str:
        part, alphabet, _ = name.split("/")
        if name in VINYALS_TEST_EXTRA or (part == "images_evaluation" and alphabet in VINYALS_TEST_ALPHABETS):
            return "test"
        if part == "images_background" and alphabet in VINYALS_VAL_ALPHABETS:
            return "val"
        return "train"
    return _named_split(class_names, assign, "omniglot vinyals split", (1028, 172, 423))


def omniglot_lake_split(class_names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Lake et al. (2015): the 964 background characters (30 alphabets) train, the 659 evaluation
    characters (20 alphabets) test; there is no validation set (val is empty)."""
    return _named_split(class_names, lambda n: "train" if n.startswith("images_background/") else "test",
                        "omniglot lake split", (964, 0, 659))
