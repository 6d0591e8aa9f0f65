"""BREEDS benchmarks (Santurkar, Tsipras, Madry, ICLR 2021) over ImageNet classes.

A BREEDS benchmark groups ImageNet classes ("subclasses") under superclasses taken from a modified
WordNet hierarchy, and splits each superclass's subclasses into a *source* half (in distribution:
training and ID validation) and a disjoint *target* half (out of distribution). The label of an
image is the position of its superclass in the benchmark's sorted superclass list.

Two ways to get a split:

* :func:`load_living17` reads the Living-17 split shipped with the package
  (``resources/living17.json``, produced by BREEDS ``make_living17(split="rand")``). This is the
  reference the pipeline uses.
* :func:`make_breeds_split` (and :func:`make_entity13`, :func:`make_entity30`,
  :func:`make_living17`, :func:`make_nonliving26`) rebuilds a benchmark from the hierarchy files
  (``class_hierarchy.txt``, ``node_names.txt``, ``dataset_class_info.json``, also shipped). It is
  a re-implementation of ``robustness/tools/breeds_helpers.py`` (MadryLab/robustness) that gives
  the same superclasses and the same subclass draws (same ``numpy.random.RandomState(2)`` call
  sequence); the tests check that it reproduces the shipped Living-17 exactly.

Nothing here touches images; see :mod:`entk_ray.data.imagenet` for that.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

HIERARCHY_ROOT = "n00001740"  # "entity"
LIVING_THING = "n00004258"
NON_LIVING_THING = "n00021939"
SPLIT_TYPES = ("rand", "good", "bad")

# The four benchmarks of the BREEDS paper: (hierarchy level, ancestor, subclasses per superclass).
# Published sizes: Entity-13 13×20, Entity-30 30×8, Living-17 17×4, Nonliving-26 26×4.
BREEDS_BENCHMARKS: dict[str, dict[str, Any]] = {
    "entity13": {"level": 3, "ancestor": None, "n_subclasses": 20},
    "entity30": {"level": 4, "ancestor": None, "n_subclasses": 8},
    "living17": {"level": 5, "ancestor": LIVING_THING, "n_subclasses": 4},
    "nonliving26": {"level": 5, "ancestor": NON_LIVING_THING, "n_subclasses": 4},
}
BREEDS_RANDOM_SEED = 2  # the seed every BREEDS benchmark is generated with


# --------------------------------------------------------------------------- the split object
@dataclass(frozen=True)
class BreedsSplit:
    """Superclasses of a BREEDS benchmark and their source (ID) / target (OOD) subclasses.

    ``source[i]`` and ``target[i]`` are the ImageNet wnids of superclass ``i`` (label ``i``), in the
    order BREEDS drew them. ``target`` is empty for every superclass when the benchmark was built
    without a split (``split=None``).
    """

    name: str
    superclass_wnids: tuple[str, ...]
    superclass_names: tuple[str, ...]
    source: tuple[tuple[str, ...], ...]
    target: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.superclass_wnids)
        if not (len(self.superclass_names) == len(self.source) == len(self.target) == n):
            raise ValueError(f"BREEDS split {self.name!r}: superclass lists have different lengths")
        overlap = set(self.source_wnids()) & set(self.target_wnids())
        if overlap:
            raise ValueError(f"BREEDS split {self.name!r}: source and target share {sorted(overlap)}")

    @property
    def num_classes(self) -> int:
        return len(self.superclass_wnids)

    def source_wnids(self) -> list[str]:
        return [w for group in self.source for w in group]

    def target_wnids(self) -> list[str]:
        return [w for group in self.target for w in group]

    def label_of(self, domain: str) -> dict[str, int]:
        """Map each subclass wnid of ``domain`` ("source" or "target") to its superclass label."""
        groups = {"source": self.source, "target": self.target}.get(domain)
        if groups is None:
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        return {wnid: label for label, group in enumerate(groups) for wnid in group}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in benchmark manifests)."""
        return {
            "name": self.name,
            "superclasses": [
                {"label": i, "wnid": w, "name": n, "source": list(s), "target": list(t)}
                for i, (w, n, s, t) in enumerate(
                    zip(self.superclass_wnids, self.superclass_names, self.source, self.target)
                )
            ],
        }


# --------------------------------------------------------------------------- shipped files
def _resource_text(filename: str) -> str:
    return resources.files("entk_ray.data").joinpath("resources", filename).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def imagenet_class_info() -> tuple[tuple[int, str, str], ...]:
    """``(imagenet_index, wnid, name)`` for the 1,000 ImageNet classes, in sorted-wnid order.

    ``imagenet_index`` is the torchvision / PyTorch label (0..999 over sorted wnids), not the
    devkit's ILSVRC2012_ID.
    """
    rows = json.loads(_resource_text("dataset_class_info.json"))
    return tuple((int(i), str(w), str(n)) for i, w, n in rows)


def load_living17() -> BreedsSplit:
    """The shipped Living-17 split (BREEDS ``make_living17(split="rand")``)."""
    data = json.loads(_resource_text("living17.json"))
    supers = sorted(data["superclasses"], key=lambda s: s["label"])
    if [s["label"] for s in supers] != list(range(len(supers))):
        raise ValueError("living17.json: superclass labels must be 0..16 without gaps")
    return BreedsSplit(
        name="living17",
        superclass_wnids=tuple(s["wnid"] for s in supers),
        superclass_names=tuple(s["name"] for s in supers),
        source=tuple(tuple(c["wnid"] for c in s["source"]) for s in supers),
        target=tuple(tuple(c["wnid"] for c in s["target"]) for s in supers),
    )


def breeds_split(name: str) -> BreedsSplit:
    """The split used by the pipeline for benchmark ``name``.

    Living-17 comes from the shipped json; the others are generated with ``split="rand"`` (the
    split type of the shipped Living-17).
    """
    if name == "living17":
        return load_living17()
    if name not in BREEDS_BENCHMARKS:
        raise ValueError(f"unknown BREEDS benchmark {name!r}; known: {', '.join(BREEDS_BENCHMARKS)}")
    return make_breeds_split(name, split="rand")


# --------------------------------------------------------------------------- the hierarchy
class ClassHierarchy:
    """BREEDS' modified ImageNet hierarchy, restricted to ancestors of the 1,000 ImageNet classes.

    Mirrors ``ClassHierarchy`` of ``breeds_helpers.py``: the graph keeps only edges on a path to an
    ImageNet class, and a node's level is its *longest* distance from the root.
    """

    def __init__(
        self,
        edges: Iterable[tuple[str, str]],
        node_names: dict[str, str],
        class_info: Iterable[tuple[int, str, str]],
        root_wnid: str = HIERARCHY_ROOT,
    ):
        class_info = list(class_info)
        self.leaf_ids = [wnid for _, wnid, _ in class_info]
        self._leaf_set = set(self.leaf_ids)
        self.leaf_id_to_num = {wnid: idx for idx, wnid, _ in class_info}
        self.leaf_id_to_name = {wnid: name for _, wnid, name in class_info}
        self.node_names = dict(node_names)
        self.children, self.parents = _ancestor_graph(self.leaf_ids, list(edges))
        self.node_to_level = _longest_path_levels(self.children, root_wnid)
        self.level_to_nodes: dict[int, list[str]] = {}
        for node, level in self.node_to_level.items():
            self.level_to_nodes.setdefault(level, []).append(node)

    @classmethod
    def from_resources(cls, root_wnid: str = HIERARCHY_ROOT) -> "ClassHierarchy":
        """The hierarchy from the files shipped in ``entk_ray/data/resources``."""
        edges = [tuple(line.split()) for line in _resource_text("class_hierarchy.txt").splitlines() if line.strip()]
        names = dict(
            line.split("\t", 1) for line in _resource_text("node_names.txt").splitlines() if line.strip()
        )
        return cls(edges, {k: v.strip() for k, v in names.items()}, imagenet_class_info(), root_wnid)

    def node_name(self, node: str) -> str:
        return self.node_names.get(node, node)

    def successors(self, node: str) -> list[str]:
        return list(self.children.get(node, ()))

    def leaves_reachable(self, node: str) -> set[str]:
        """ImageNet classes below ``node`` (the search stops at an ImageNet class)."""
        leaves: set[str] = set()
        todo = {node}
        while todo:
            frontier, todo = todo, set()
            for parent in frontier:
                for child in self.children.get(parent, ()):
                    if child in self._leaf_set:
                        leaves.add(child)
                    else:
                        todo.add(child)
        if node in self._leaf_set:
            leaves.add(node)
        return leaves

    def descendants_within(self, node: str, depth: int = 20) -> set[str]:
        """``node`` and everything at most ``depth`` edges below it (BREEDS' ``traverse``)."""
        found, frontier = {node}, [node]
        for _ in range(depth):
            frontier = [c for n in frontier for c in self.children.get(n, ())]
            found.update(frontier)
        return found

    def nodes_at_level(self, level: int, ancestor: str | None = None) -> set[str]:
        """Nodes at ``level`` (longest distance from the root), optionally below ``ancestor``."""
        nodes = set(self.level_to_nodes.get(level, ()))
        if ancestor is not None:
            nodes &= self.descendants_within(ancestor)
        return nodes


def _ancestor_graph(leaf_ids: list[str], edges: list[tuple[str, str]]):
    """Children/parents maps of the sub-graph of edges that lead to an ImageNet class."""
    all_parents: dict[str, list[str]] = {}
    for edge in edges:
        if len(edge) != 2:
            raise ValueError(f"class hierarchy edge must be 'parent child', got {' '.join(edge)!r}")
        parent, child = edge
        all_parents.setdefault(child, []).append(parent)
    children: dict[str, dict[str, None]] = {}
    parents: dict[str, dict[str, None]] = {}
    todo = {leaf for leaf in leaf_ids if leaf in all_parents}
    seen: set[str] = set()
    while todo:
        frontier, todo = todo, set()
        for node in frontier:
            seen.add(node)
            for parent in all_parents.get(node, ()):
                children.setdefault(parent, {})[node] = None
                parents.setdefault(node, {})[parent] = None
                if parent not in seen:
                    todo.add(parent)
    return children, parents


def _longest_path_levels(children: dict[str, dict[str, None]], root: str) -> dict[str, int]:
    """Level of every node reachable from ``root``: its longest path length from the root."""
    reachable, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in reachable:
                reachable.add(child)
                stack.append(child)
    indegree = {n: 0 for n in reachable}
    for n in reachable:
        for child in children.get(n, ()):
            indegree[child] += 1
    level = {root: 0}
    ready = [root]
    while ready:
        node = ready.pop()
        for child in children.get(node, ()):
            level[child] = max(level.get(child, 0), level[node] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if len(level) != len(reachable):
        raise ValueError("class hierarchy has a cycle below the root")
    return level


# --------------------------------------------------------------------------- dataset generator
def split_superclass(
    hierarchy: ClassHierarchy,
    superclass: str,
    n_subclasses: int,
    balanced: bool,
    split_type: str,
    rng: np.random.RandomState,
) -> tuple[list[str], list[str]]:
    """Two disjoint lists of subclass wnids of ``superclass`` (BREEDS ``split_superclass``)."""
    node, desc = superclass, sorted(hierarchy.successors(superclass))
    while len(desc) == 1:  # descend to the first node with at least two children
        node = desc[0]
        desc = sorted(hierarchy.successors(node))
    desc_map = {d: sorted(hierarchy.leaves_reachable(d)) for d in desc}
    desc_sorted = sorted(desc_map.items(), key=lambda item: -len(item[1]))

    if not balanced:
        total = sum(len(d) for d in desc_map.values())
        if total < n_subclasses:
            raise ValueError(f"superclass {superclass} has {total} subclasses, fewer than {n_subclasses}")
        n_subclasses = total if total % 2 == 0 else max(total - 1, 2)
    if n_subclasses % 2:
        raise ValueError(f"n_subclasses must be even to split a superclass, got {n_subclasses}")
    half = n_subclasses // 2

    if split_type == "rand":
        pool = [w for leaves in desc_map.values() for w in leaves]
        chosen = rng.choice(sorted(pool), half * 2, replace=False)
        split = (list(chosen[:half]), list(chosen[half:]))
    elif split_type in ("good", "bad"):
        split = _structured_split(desc_sorted, half, split_type)
    else:
        raise ValueError(f"split type must be one of {', '.join(SPLIT_TYPES)} or None, got {split_type!r}")

    if len(split[0]) != len(split[1]) or set(split[0]) & set(split[1]):
        raise ValueError(f"superclass {superclass}: could not split into two disjoint halves of {half}")
    return [str(w) for w in split[0]], [str(w) for w in split[1]]


def _structured_split(desc_sorted, half: int, split_type: str) -> tuple[list[str], list[str]]:
    """BREEDS' "good" (similar subclasses on both sides) / "bad" (kept apart) partitions."""
    split: tuple[list[str], list[str]] = ([], [])
    spare: list[str] = []
    for _, leaves in desc_sorted:
        filled = [len(s) for s in split]
        if split_type == "bad":
            if filled[0] <= filled[1] and filled[0] < half:
                spare.extend(leaves[half - filled[0]:])
                split[0].extend(leaves[: half - filled[0]])
            elif filled[1] < half:
                spare.extend(leaves[half - filled[1]:])
                split[1].extend(leaves[: half - filled[1]])
        else:
            if len(leaves) == 1:
                cut = 1 if filled[0] < half else 0
            else:
                cut = min(len(leaves) // 2, half - filled[0])
            if filled[0] < half:
                split[0].extend(leaves[:cut])
            if filled[1] < half:
                split[1].extend(leaves[cut: cut + half - filled[1]])
    if split_type == "bad":
        filled = [len(s) for s in split]
        if max(filled) != half:
            raise ValueError("'bad' split could not fill either half")
        if filled[0] < half:
            split[0].extend(spare[: half - filled[0]])
        if filled[1] < half:
            split[1].extend(spare[: half - filled[1]])
    return split


def get_superclasses(
    hierarchy: ClassHierarchy,
    level: int,
    n_subclasses: int | None = None,
    split: str | None = None,
    ancestor: str | None = None,
    balanced: bool = True,
    random_seed: int = BREEDS_RANDOM_SEED,
    name: str = "breeds",
) -> BreedsSplit:
    """Superclasses at ``level`` (below ``ancestor``) with their subclasses (BREEDS ``get_superclasses``).

    With ``split`` ("rand" / "good" / "bad") each superclass's subclasses are divided into source and
    target halves; with ``split=None`` all chosen subclasses are in ``source``.
    """
    if split is not None and split not in SPLIT_TYPES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_TYPES)} or None, got {split!r}")
    rng = np.random.RandomState(random_seed)
    candidates = sorted(hierarchy.nodes_at_level(level, ancestor=ancestor))
    if not candidates:
        raise ValueError(f"no hierarchy nodes at level {level} below {ancestor or 'the root'}")
    leaves = [sorted(hierarchy.leaves_reachable(n)) for n in candidates]
    min_leaves = min(len(d) for d in leaves)
    if min_leaves == 0:
        raise ValueError(f"a level-{level} node has no ImageNet class below it")
    if n_subclasses is None:
        if balanced:
            n_subclasses = min_leaves if min_leaves % 2 == 0 else max(2, min_leaves - 1)
        else:
            n_subclasses = 1 if split is None else 2

    keep = [i for i in range(len(candidates)) if len(leaves[i]) >= n_subclasses]
    superclasses = [candidates[i] for i in keep]
    sub_pools = [leaves[i] for i in keep]
    names = tuple(hierarchy.node_name(s) for s in superclasses)

    if split is None:
        counts = [n_subclasses] * len(sub_pools) if balanced else [len(d) for d in sub_pools]
        source = tuple(
            tuple(str(w) for w in rng.choice(pool, n, replace=False)) for n, pool in zip(counts, sub_pools)
        )
        target: tuple[tuple[str, ...], ...] = tuple(() for _ in superclasses)
    else:
        halves = [
            split_superclass(hierarchy, s, n_subclasses, balanced, split, rng) for s in sorted(superclasses)
        ]
        source = tuple(tuple(h[0]) for h in halves)
        target = tuple(tuple(h[1]) for h in halves)
    return BreedsSplit(name, tuple(superclasses), names, source, target)


def make_breeds_split(
    name: str, split: str | None = "rand", hierarchy: ClassHierarchy | None = None
) -> BreedsSplit:
    """One of the four BREEDS benchmarks built from the hierarchy, as in ``breeds_helpers.make_*``."""
    if name not in BREEDS_BENCHMARKS:
        raise ValueError(f"unknown BREEDS benchmark {name!r}; known: {', '.join(BREEDS_BENCHMARKS)}")
    spec = BREEDS_BENCHMARKS[name]
    return get_superclasses(
        hierarchy or _shipped_hierarchy(),
        level=spec["level"],
        n_subclasses=spec["n_subclasses"],
        split=split,
        ancestor=spec["ancestor"],
        balanced=True,
        random_seed=BREEDS_RANDOM_SEED,
        name=name,
    )


@lru_cache(maxsize=1)
def _shipped_hierarchy() -> ClassHierarchy:
    return ClassHierarchy.from_resources()


def make_entity13(split: str | None = "rand") -> BreedsSplit:
    return make_breeds_split("entity13", split)


def make_entity30(split: str | None = "rand") -> BreedsSplit:
    return make_breeds_split("entity30", split)


def make_living17(split: str | None = "rand") -> BreedsSplit:
    return make_breeds_split("living17", split)


def make_nonliving26(split: str | None = "rand") -> BreedsSplit:
    return make_breeds_split("nonliving26", split)
