"""BREEDS splits: the shipped Living-17, and the hierarchy-based construction of all four benchmarks."""
from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from entk_ray.data.breeds import (
    BreedsSplit,
    ClassHierarchy,
    breeds_split,
    get_superclasses,
    imagenet_class_info,
    load_living17,
    make_breeds_split,
    make_entity13,
    make_entity30,
    make_living17,
    make_nonliving26,
)

# (superclasses, subclasses per superclass) published in the BREEDS paper (Santurkar et al. 2021).
PUBLISHED_SHAPES = {"entity13": (13, 20), "entity30": (30, 8), "living17": (17, 4), "nonliving26": (26, 4)}

# sha256 of BreedsSplit.to_dict() for split="rand"; each was checked to equal the output of
# MadryLab/robustness `robustness/tools/breeds_helpers.py` make_* on the same hierarchy files
# (all four benchmarks, split rand/good/bad/None, matched exactly).
GOLDEN_RAND = {
    "entity13": "3ac31199b5069512",
    "entity30": "fd91408c344b0a1d",
    "living17": "8c31ea8e4e6d1656",
    "nonliving26": "30faf67283eed558",
}

ENTITY13_NAMES = ["garment", "bird", "reptile", "arthropod", "mammal", "accessory", "craft", "equipment",
                  "furniture", "instrument", "man-made structure", "wheeled vehicle", "produce"]


def digest(split: BreedsSplit) -> str:
    return hashlib.sha256(json.dumps(split.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def test_resources_ship_with_the_package():
    folder = resources.files("entk_ray.data").joinpath("resources")
    for name in ("living17.json", "class_hierarchy.txt", "dataset_class_info.json", "node_names.txt"):
        assert folder.joinpath(name).read_text(encoding="utf-8").strip(), name
    info = imagenet_class_info()
    assert len(info) == 1000 and [i for i, _, _ in info] == list(range(1000))
    assert [w for _, w, _ in info] == sorted(w for _, w, _ in info)  # torchvision's sorted-wnid order


def test_shipped_living17_has_17_superclasses_of_2_plus_2():
    split = load_living17()
    assert split.num_classes == 17
    assert all(len(s) == 2 for s in split.source) and all(len(t) == 2 for t in split.target)
    assert len(set(split.source_wnids() + split.target_wnids())) == 68
    assert list(split.superclass_wnids) == sorted(split.superclass_wnids)  # label = sorted position
    assert split.superclass_names[8] == "dog, domestic dog, Canis familiaris"
    assert split.label_of("source")["n02088466"] == 8 and split.label_of("target")["n02111500"] == 8


def test_shipped_living17_imagenet_indices_agree_with_class_info():
    data = json.loads(resources.files("entk_ray.data").joinpath("resources", "living17.json").read_text())
    index_of = {w: i for i, w, _ in imagenet_class_info()}
    for superclass in data["superclasses"]:
        for sub in superclass["source"] + superclass["target"]:
            assert index_of[sub["wnid"]] == sub["imagenet_index"], sub


def test_generated_living17_equals_the_shipped_split():
    shipped, generated = load_living17(), make_living17(split="rand")
    assert generated.superclass_wnids == shipped.superclass_wnids
    assert generated.superclass_names == shipped.superclass_names
    assert generated.source == shipped.source  # same subclasses, drawn in the same order
    assert generated.target == shipped.target
    assert breeds_split("living17") == shipped


@pytest.mark.parametrize("name", list(PUBLISHED_SHAPES))
def test_benchmark_shapes_match_the_paper(name):
    n_super, n_sub = PUBLISHED_SHAPES[name]
    split = make_breeds_split(name, split="rand")
    assert split.num_classes == n_super
    assert {len(s) for s in split.source} == {len(t) for t in split.target} == {n_sub // 2}
    all_subclasses = split.source_wnids() + split.target_wnids()
    assert len(all_subclasses) == len(set(all_subclasses)) == n_super * n_sub
    assert digest(split) == GOLDEN_RAND[name]
    unsplit = make_breeds_split(name, split=None)
    assert unsplit.superclass_wnids == split.superclass_wnids
    assert {len(s) for s in unsplit.source} == {n_sub} and set(unsplit.target) == {()}


@pytest.mark.parametrize("split_type", ["good", "bad"])
def test_structured_splits_keep_the_shape(split_type):
    split = make_entity30(split=split_type)
    assert split.num_classes == 30 and {len(s) for s in split.source} == {len(t) for t in split.target} == {4}
    assert split != make_entity30(split="rand")


def test_entity13_superclasses_are_the_published_ones():
    names = [n.split(",")[0] for n in make_entity13().superclass_names]
    assert names == ENTITY13_NAMES
    assert make_nonliving26().superclass_names[0] == "bag"


def test_hierarchy_levels_are_longest_paths_and_stop_at_imagenet_classes():
    # root → a → b → leaf1 and root → b: b's level is its longest distance (2), as in BREEDS.
    edges = [("root", "a"), ("a", "b"), ("root", "b"), ("b", "leaf1"), ("b", "leaf2"),
             ("leaf1", "leaf3"), ("root", "orphan")]
    info = [(0, "leaf1", "one"), (1, "leaf2", "two"), (2, "leaf3", "three")]
    hierarchy = ClassHierarchy(edges, {"a": "A", "b": "B"}, info, root_wnid="root")
    assert hierarchy.node_to_level == {"root": 0, "a": 1, "b": 2, "leaf1": 3, "leaf2": 3, "leaf3": 4}
    assert "orphan" not in hierarchy.node_to_level  # no ImageNet class below it
    assert hierarchy.leaves_reachable("b") == {"leaf1", "leaf2"}  # stops at leaf1
    assert hierarchy.nodes_at_level(2, ancestor="a") == {"b"}
    split = get_superclasses(hierarchy, level=2, n_subclasses=2, split="rand", name="toy")
    drawn = split.source_wnids() + split.target_wnids()
    # BREEDS pools the ImageNet classes reachable from each child of b: leaf1 also reaches leaf3.
    assert split.superclass_wnids == ("b",) and len(set(drawn)) == 2 and set(drawn) <= {"leaf1", "leaf2", "leaf3"}


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown BREEDS benchmark 'living18'"):
        breeds_split("living18")
    with pytest.raises(ValueError, match="split must be one of"):
        make_breeds_split("living17", split="random")
    with pytest.raises(ValueError, match="domain"):
        load_living17().label_of("ood")
