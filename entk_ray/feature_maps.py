"""Feature maps: how the per-example gradient g(x) = ∂f(x)/∂θ becomes the feature φ(x) ∈ R^p.

A :class:`FeatureMap` is a fixed linear map M applied to the full per-example gradient,
φ(x) = M g(x), with a fingerprint that keys every artifact computed from it. Two families:

* **Coordinate subsets** (:class:`SubsetMap`): M selects the p coordinates of a
  :class:`~entk_ray.features.ParameterSubset` S, φ(x) = g(x)_S. Computed by the feature computers
  of :mod:`entk_ray.features` (the sampled one by default) without forming g. Kinds:

  - ``uniform`` — p coordinates uniformly without replacement from the backbone (today's S,
    :func:`~entk_ray.features.select_parameters`; the default; its fingerprint is S's, unchanged);
  - ``head`` — the same draw over the backbone *and* the scalar head's weights;
  - ``stratified`` — the same fraction p/D of every parameter tensor (largest-remainder rounding);
  - ``last_blocks:k`` — uniform over the parameters of the last k blocks (a block: the module
    path up to its first run of numeric indices, e.g. ``blocks.5.0`` or ``layer4.2``; parameters
    after the last block, e.g. ``conv_head``, belong to it; those before the first form a stem);
  - ``norm`` — uniform over normalization parameters (BatchNorm, LayerNorm, GroupNorm affine).

  When fewer than p coordinates are eligible, all are taken (``p`` reports the true count).

* **A Johnson–Lindenstrauss projection** (:class:`JLMap`, ``jl`` or ``jl:gaussian``):
  φ(x) = R g(x) / √p with R ∈ R^{p×D} of i.i.d. Rademacher (±1, the default) or standard normal
  entries, E[φ(x)ᵀφ(x')] = g(x)ᵀg(x'). R is never stored: its columns for each parameter tensor
  are drawn in chunks of rows of g from a generator seeded by (seed, tensor name, chunk), on the
  CPU so every device and machine draws the same R. See :class:`JLFeatureComputer` for the cost.

Nested maps (:meth:`FeatureMap.restrict`): a map at p' < p whose Φ is a column selection of this
map's Φ (times a constant), so one feature pass at the largest p serves every smaller p. For a
subset, a seeded sub-draw of its coordinates (uniform, or per tensor for ``stratified``); for JL,
the first p' rows of the same R, Φ' = Φ[:, :p'] · √(p/p').

A map is named by a spec string (``features.map`` in the config): :func:`parse_map_spec` checks
it, :func:`build_feature_map` builds it for a model from (p, seed, include_head).
"""
from __future__ import annotations

import abc
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from entk_ray.features import (FeatureComputer, HookFeatureComputer, ParameterSubset, candidate_parameters,
                               layout_seed, make_feature_computer, select_parameters, uniform_indices)
from entk_ray.fingerprints import digest

MAP_KINDS = ("uniform", "head", "stratified", "last_blocks", "norm", "jl")
JL_DISTRIBUTIONS = ("rademacher", "gaussian")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class MapSpec:
    """A parsed ``features.map`` string: ``kind`` and its one argument (k for last_blocks, the
    distribution for jl)."""

    kind: str
    blocks: int = 0
    distribution: str = "rademacher"

    def __str__(self) -> str:
        if self.kind == "last_blocks":
            return f"last_blocks:{self.blocks}"
        if self.kind == "jl":
            return "jl" if self.distribution == "rademacher" else f"jl:{self.distribution}"
        return self.kind


def parse_map_spec(spec: str) -> MapSpec:
    """``uniform | head | stratified | norm | last_blocks:K | jl | jl:rademacher | jl:gaussian``.

    Raises ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a feature map must be a non-empty string, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown feature map {spec!r}: the kind must be one of {', '.join(MAP_KINDS)}")
    if kind == "last_blocks":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"feature map {spec!r}: last_blocks needs a positive block count, e.g. last_blocks:2")
        return MapSpec(kind, blocks=int(arg))
    if kind == "jl":
        distribution = arg or "rademacher"
        if distribution not in JL_DISTRIBUTIONS:
            raise ValueError(f"feature map {spec!r}: the JL distribution must be one of {', '.join(JL_DISTRIBUTIONS)}")
        return MapSpec(kind, distribution=distribution)
    if arg:
        raise ValueError(f"feature map {spec!r}: {kind} takes no argument")
    return MapSpec(kind)


class FeatureMap(abc.ABC):
    """φ(x) = M g(x) for the full per-example gradient g(x) of the candidate parameters.

    ``names``/``shapes``: the parameters g covers (model order); ``p``: columns of Φ."""

    spec: MapSpec
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    @abc.abstractmethod
    def p(self) -> int:
        """Columns of Φ."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """16 hex characters; equal iff the map (hence Φ for the same model and data) is equal."""

    @abc.abstractmethod
    def computer(self, model: nn.Module, method: str = "auto", chunk_size: int = 8,
                 tf32: bool = False) -> FeatureComputer:
        """A feature computer producing this map's Φ (B, p) for batches of inputs."""

    @abc.abstractmethod
    def from_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Φ (B, p) from full per-example gradients ``grads[name]`` of shape (B, *shape): the
        definition the computers must match."""

    @abc.abstractmethod
    def restrict(self, p: int, seed: int) -> tuple["FeatureMap", np.ndarray, float]:
        """(map at p' = min(p, self.p), columns, scale): the smaller map's Φ equals
        ``scale · Φ[:, columns]`` of this map's Φ."""

    def describe(self) -> dict:
        return {"map": str(self.spec), "p": self.p, "fingerprint": self.fingerprint()}


# --------------------------------------------------------------------------------------------
# Coordinate subsets
# --------------------------------------------------------------------------------------------
class SubsetMap(FeatureMap):
    """φ(x) = g(x)_S for a parameter subset S (see the module docstring for the kinds)."""

    def __init__(self, spec: MapSpec, subset: ParameterSubset):
        self.spec = spec
        self.subset = subset
        self.names, self.shapes = subset.names, subset.shapes

    @property
    def p(self) -> int:
        return self.subset.p

    @property
    def flat_indices(self) -> np.ndarray:
        return self.subset.flat_indices

    def per_parameter(self) -> dict[str, torch.Tensor]:
        return self.subset.per_parameter()

    def fingerprint(self) -> str:
        # S's own fingerprint: the uniform default keeps the key its artifacts were stored under.
        return self.subset.fingerprint()

    def computer(self, model, method="auto", chunk_size=8, tf32=False) -> FeatureComputer:
        return make_feature_computer(model, self.subset, method, chunk_size, tf32=tf32)

    def from_gradients(self, grads):
        local = self.subset.per_parameter()
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1)[:, local[n]] for n in self.names if n in local], 1)

    def restrict(self, p, seed):
        _positive("p", p)
        if p >= self.p:
            return self, np.arange(self.p), 1.0
        if self.spec.kind == "stratified":
            counts = np.array([idx.numel() for idx in self.subset.per_parameter().values()])
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            quotas = _largest_remainder(counts, p)
            rng = np.random.default_rng([int(seed), int(p), 0x5E1EC7])
            columns = np.concatenate([start + np.sort(rng.choice(count, size=quota, replace=False))
                                      for start, count, quota in zip(starts, counts, quotas)])
        else:
            rng = np.random.default_rng([int(seed), int(p), 0x5E1EC7])
            columns = np.sort(rng.choice(self.p, size=int(p), replace=False))
        columns = columns.astype(np.int64)
        child = ParameterSubset(self.names, self.shapes, self.subset.flat_indices[columns], int(seed))
        return SubsetMap(self.spec, child), columns, 1.0


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers q_t ≤ weights_t with Σ q_t = min(total, Σ weights) and q_t ≈ total·w_t/Σw."""
    weights = np.asarray(weights, dtype=np.int64)
    total = int(min(total, weights.sum()))
    exact = weights * (total / weights.sum())
    quotas = np.minimum(np.floor(exact).astype(np.int64), weights)
    short = total - int(quotas.sum())
    if short > 0:  # the largest remainders get one more (ties: model order), never above w_t
        order = np.argsort(-(exact - quotas), kind="stable")
        order = order[quotas[order] < weights[order]]
        quotas[order[:short]] += 1
    return quotas


def _stratified_over(names, shapes, p: int, seed: int) -> np.ndarray:
    """The same fraction p/D of every tensor: q_t by largest remainder, then q_t uniform within t."""
    sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
    quotas = _largest_remainder(sizes, p)
    rng = np.random.default_rng([int(seed), layout_seed(names, shapes), 0x57A7])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = [offset + np.sort(rng.choice(size, size=quota, replace=False))
             for offset, size, quota in zip(offsets, sizes, quotas) if quota]
    return np.concatenate(parts).astype(np.int64)


def parameter_blocks(names: list[str]) -> list[list[str]]:
    """Group parameter names (model order) into blocks: the path up to its first run of numeric
    components (``backbone.blocks.5.0.conv_pw.weight`` → ``backbone.blocks.5.0``); a name without
    one joins the block before it, or the stem if no block came yet."""
    groups: list[list[str]] = []
    keys: list[str | None] = []
    for name in names:
        parts = name.split(".")
        key = None
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                j = i
                while j + 1 < len(parts) - 1 and parts[j + 1].isdigit():
                    j += 1
                key = ".".join(parts[:j + 1])
                break
        if key is None:
            if groups:
                groups[-1].append(name)
                continue
            key = "<stem>"
        if keys and keys[-1] == key:
            groups[-1].append(name)
        else:
            keys.append(key)
            groups.append([name])
    return groups


def _norm_parameters(model: nn.Module) -> set[str]:
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False))
    return names


def build_feature_map(model: nn.Module, spec: str | MapSpec, p: int, seed: int,
                      include_head: bool = False) -> FeatureMap:
    """The map named by ``spec`` for ``model``, at p columns, drawn with ``seed``.

    ``include_head`` adds the head's weights to the candidates of ``uniform``, ``stratified`` and
    ``jl`` (``head`` always includes them)."""
    spec = parse_map_spec(spec) if isinstance(spec, str) else spec
    _positive("p", p)
    if spec.kind == "uniform":
        return SubsetMap(spec, select_parameters(model, p, seed, include_head=include_head))
    if spec.kind == "head":
        return SubsetMap(spec, select_parameters(model, p, seed, include_head=True))
    named = candidate_parameters(model, include_head)
    if spec.kind == "last_blocks":
        blocks = parameter_blocks([n for n, _ in named])
        keep = {n for block in blocks[-spec.blocks:] for n in block}
        named = [(n, prm) for n, prm in named if n in keep]
    elif spec.kind == "norm":
        norm = _norm_parameters(model)
        named = [(n, prm) for n, prm in named if n in norm]
        if not named:
            raise ValueError("feature map 'norm': the model has no normalization parameters")
    names = tuple(n for n, _ in named)
    shapes = tuple(tuple(int(d) for d in prm.shape) for _, prm in named)
    if spec.kind == "jl":
        return JLMap(spec, names, shapes, p, seed)
    draw = _stratified_over if spec.kind == "stratified" else uniform_indices
    return SubsetMap(spec, ParameterSubset(names, shapes, draw(names, shapes, p, seed), int(seed)))


# --------------------------------------------------------------------------------------------
# Johnson–Lindenstrauss projection
# --------------------------------------------------------------------------------------------
JL_CHUNK_ELEMENTS = 1 << 22  # values of R drawn at once: rows_per_chunk = max(1, 2^22 // draw_p)


class JLMap(FeatureMap):
    """φ(x) = R g(x)/√p, R's entries i.i.d. Rademacher or N(0, 1), seeded (never stored).

    ``draw_p`` ≥ p: R is the first p rows of a draw at ``draw_p`` rows (a nested map; see
    :meth:`restrict`). The block of R for parameter ``name`` and its flat coordinates
    [r·c, (r+1)·c) (c = rows_per_chunk) is drawn as a (c, draw_p) matrix from a CPU generator
    seeded by (seed, name, r): any device and machine draws the same R."""

    def __init__(self, spec: MapSpec, names, shapes, p: int, seed: int, draw_p: int | None = None):
        _positive("p", p)
        self.spec = spec
        self.names, self.shapes = tuple(names), tuple(tuple(s) for s in shapes)
        self._p = int(p)
        self.draw_p = int(draw_p or p)
        if self.draw_p < self._p:
            raise ValueError(f"JL draw_p ({self.draw_p}) must be at least p ({self._p})")
        self.seed = int(seed)
        self.rows_per_chunk = max(1, JL_CHUNK_ELEMENTS // self.draw_p)

    @property
    def p(self) -> int:
        return self._p

    @property
    def total(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def fingerprint(self) -> str:
        return digest({"map": "jl", "version": 1, "distribution": self.spec.distribution, "p": self._p,
                       "draw_p": self.draw_p, "seed": self.seed, "rows_per_chunk": self.rows_per_chunk,
                       "parameters": [[n, list(s)] for n, s in zip(self.names, self.shapes)]})

    def chunk(self, name: str, index: int, rows: int) -> torch.Tensor:
        """Rows [index·c, index·c + rows) of R's block for ``name``, shape (rows, p), float32 (CPU)."""
        key = hashlib.sha256(f"{self.seed}|{name}|{index}".encode()).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
        if self.spec.distribution == "gaussian":
            block = torch.randn((rows, self.draw_p), generator=gen, dtype=torch.float32)
        else:
            block = torch.randint(0, 2, (rows, self.draw_p), generator=gen, dtype=torch.int8).to(torch.float32)
            block.mul_(2.0).sub_(1.0)
        return block[:, :self._p]

    def project_into(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        """out += grad (B, n) @ R_nameᵀ (n, p), chunk by chunk (unscaled)."""
        c = self.rows_per_chunk
        for index, start in enumerate(range(0, grad.shape[1], c)):
            rows = min(c, grad.shape[1] - start)
            block = self.chunk(name, index, rows).to(out.device, non_blocking=True)
            out.addmm_(grad[:, start:start + rows], block)

    def computer(self, model, method="auto", chunk_size=8, tf32=False) -> FeatureComputer:
        return JLFeatureComputer(model, self, tf32=tf32)

    def from_gradients(self, grads):
        first = next(iter(grads.values()))
        out = torch.zeros((first.shape[0], self._p), dtype=torch.float32, device=first.device)
        for name in self.names:
            self.project_into(out, name, grads[name].reshape(first.shape[0], -1).float())
        return out.div_(math.sqrt(self._p))

    def restrict(self, p, seed):
        _positive("p", p)
        if p >= self._p:
            return self, np.arange(self._p), 1.0
        child = JLMap(self.spec, self.names, self.shapes, int(p), self.seed, draw_p=self.draw_p)
        return child, np.arange(int(p)), math.sqrt(self._p / p)


class JLFeatureComputer(HookFeatureComputer):
    """Φ = R g / √p from one forward, one activation-only backward and, per layer, the full
    per-example gradient of the layer (as :class:`~entk_ray.features.HookFeatureComputer` forms
    it), projected chunk by chunk and dropped before the next layer.

    Cost per batch beyond the hook computer's: B × D × p multiply-adds (D: candidate parameters)
    and D × p random draws (R is regenerated each batch; a larger batch amortizes it), against
    B × Σ_layers p_layer × L_layer for a sampled subset. Memory beyond the backward's: Φ, one
    layer's per-example gradient (B × its size) and one chunk of R (2^22 values)."""

    method_name = "jl"

    def __init__(self, model: nn.Module, jl: JLMap, tf32: bool = False):
        everything = ParameterSubset(jl.names, jl.shapes, np.arange(jl.total, dtype=np.int64), jl.seed)
        super().__init__(model, everything, tf32=tf32)
        self.jl = jl

    @property
    def output_dim(self) -> int:
        return self.jl.p

    def _features(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        batch = x.shape[0]
        records, deltas = self._capture(x)
        if out is None:
            out = torch.empty((batch, self.jl.p), dtype=torch.float32, device=x.device)
        out.zero_()
        for (name, rec), delta in zip(records.items(), deltas):
            if delta is None:
                continue  # the layer does not influence the output: zero gradient
            grads = self._layer_grads(name, self.layers[name], rec["in"], delta.detach())
            rec.clear()  # this layer's activations are no longer needed
            for pname, grad in grads.items():
                self.jl.project_into(out, pname, grad.reshape(batch, -1).float())
                del grad
        return out.div_(math.sqrt(self.jl.p))


# --------------------------------------------------------------------------------------------
def map_from_config(model: nn.Module, feature_cfg) -> FeatureMap:
    """The map of a :class:`~entk_ray.config.FeatureConfig` (``map``, ``p``, ``param_seed``,
    ``include_head``)."""
    return build_feature_map(model, getattr(feature_cfg, "map", "uniform"), feature_cfg.p, feature_cfg.param_seed,
                             include_head=feature_cfg.include_head)
