"""Per-example gradient features: the empirical NTK's feature map.

For a model with scalar output f(x) = wᵀ g_θ(x) the eNTK feature of an example is

    φ(x) = [∂f(x)/∂θ_k]_{k ∈ S}  ∈ R^p,

the gradient with respect to a fixed subset S of p parameter coordinates. The model is in eval
mode, so BatchNorm uses running statistics and φ(x) depends on x alone: features computed in any
batch, shard, process or machine agree.

Two stages live here:

* :class:`ParameterSubset` — S, drawn once from (parameter names + shapes, p, seed) with a stable
  hash, so every shard and every evaluation set uses the same coordinates.
* :class:`FeatureComputer` — maps a batch of images to Φ ∈ R^{B×p}. Implementations:

  - :class:`FuncFeatureComputer`: ``torch.func.vmap(grad(f))`` over the batch, in chunks. Works for
    any model; memory is chunk × (#parameters owning a coordinate of S) floats.
  - :class:`HookFeatureComputer`: one batched forward and one backward *to the activations only*;
    each layer's per-example parameter gradient is then formed from its input and output
    gradient (conv: ∂f/∂W_b = Σ_l δ_b[:, l] ⊗ unfold(x_b)[:, l]; linear: δ_b ⊗ x_b; BatchNorm
    affine: Σ δ_b · x̂_b and Σ δ_b). Because the examples are independent in eval mode,
    ∂(Σ_b f(x_b))/∂h_b = ∂f(x_b)/∂h_b for every activation h, so one backward gives every
    example's output gradients. Cost ≈ one forward + backward of the batch.

Both return float32 (optionally stored as float16/bfloat16) and agree to round-off (tested).
"""
from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# The parameter subset S
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterSubset:
    """A fixed set of p coordinates of the model's flattened candidate parameters.

    ``names``/``shapes`` list the candidate parameters in model order; the flattened vector is
    their concatenation. ``flat_indices`` are the chosen coordinates (sorted, unique) in that
    vector, and feature k of φ is coordinate ``flat_indices[k]``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flat_indices: np.ndarray
    seed: int

    @property
    def p(self) -> int:
        return int(self.flat_indices.shape[0])

    @property
    def total(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def per_parameter(self) -> dict[str, torch.Tensor]:
        """Local flat indices of S inside each parameter that owns at least one coordinate."""
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            lo, hi = np.searchsorted(self.flat_indices, [offset, offset + size])
            if hi > lo:
                out[name] = torch.from_numpy(self.flat_indices[lo:hi] - offset).long()
            offset += size
        return out

    def fingerprint(self) -> str:
        """Stable hash of (names, shapes, chosen coordinates): equal iff S is equal."""
        h = hashlib.sha256()
        for name, shape in zip(self.names, self.shapes):
            h.update(f"{name}:{tuple(shape)};".encode())
        h.update(np.ascontiguousarray(self.flat_indices, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def candidate_parameters(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters eligible for S: the backbone's, plus the head's if asked.

    A model without ``backbone``/``head`` attributes contributes all its trainable parameters.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hasattr(model, "backbone") and not include_head:
        named = [(n, p) for n, p in named if n.startswith("backbone.")]
    return named


def select_parameters(model: nn.Module, p: int, seed: int, include_head: bool = False) -> ParameterSubset:
    """Draw S: p coordinates uniformly without replacement from the candidate parameters.

    The draw depends only on (names, shapes, p, seed): the RNG is seeded with ``seed`` and a
    hash of the names and shapes, so two processes building the same model get the same S.
    ``p >= total`` selects every coordinate.
    """
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p <= 0:
        raise ValueError(f"p must be a positive integer, got {p!r}")
    named = candidate_parameters(model, include_head)
    if not named:
        raise ValueError("the model has no trainable parameters to select from")
    names = tuple(n for n, _ in named)
    shapes = tuple(tuple(int(d) for d in prm.shape) for _, prm in named)
    total = int(sum(int(np.prod(s)) for s in shapes))
    if p >= total:
        indices = np.arange(total, dtype=np.int64)
    else:
        layout = hashlib.sha256(repr(list(zip(names, shapes))).encode()).digest()
        rng = np.random.default_rng([int(seed), int.from_bytes(layout[:8], "little")])
        indices = np.sort(rng.choice(total, size=int(p), replace=False)).astype(np.int64)
    return ParameterSubset(names=names, shapes=shapes, flat_indices=indices, seed=int(seed))


# --------------------------------------------------------------------------------------------
# Feature computers
# --------------------------------------------------------------------------------------------
class FeatureComputer(abc.ABC):
    """Maps a batch of inputs ``x`` (B, ...) to features Φ (B, p) of the scalar model output."""

    def __init__(self, model: nn.Module, subset: ParameterSubset):
        if model.training:
            raise ValueError("features need the model in eval mode (call model.eval()): "
                             "in train mode BatchNorm mixes the examples of a batch")
        self.model = model
        self.subset = subset
        self.local_indices = subset.per_parameter()
        params = dict(model.named_parameters())
        missing = [n for n in subset.names if n not in params]
        if missing:
            raise ValueError(f"parameter subset names parameters the model lacks: {missing[:5]}")
        self.params = {n: params[n] for n in subset.names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Φ for the batch, float32, shape (B, p), on the model's device."""

    def _assemble(self, grads: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Gather S's coordinates from per-parameter per-example gradients (B, *shape) into Φ."""
        device = next(iter(grads.values())).device
        out = torch.empty((batch, self.subset.p), dtype=torch.float32, device=device)
        col = 0
        for name in self.subset.names:
            idx = self.local_indices.get(name)
            if idx is None:
                continue
            flat = grads[name].reshape(batch, -1)
            out[:, col:col + idx.numel()] = flat[:, idx.to(device)]
            col += idx.numel()
        return out


class FuncFeatureComputer(FeatureComputer):
    """Reference implementation: ``vmap(grad(f))`` over the batch with ``torch.func``.

    Gradients are taken only with respect to parameters owning a coordinate of S, ``chunk_size``
    examples at a time, so at most chunk_size × (their total size) floats are live at once.
    """

    def __init__(self, model: nn.Module, subset: ParameterSubset, chunk_size: int = 8):
        super().__init__(model, subset)
        self.chunk_size = int(chunk_size)
        self.buffers = dict(model.named_buffers())
        self.wrt = {n: p.detach() for n, p in self.params.items() if n in self.local_indices}
        all_params = {n: p.detach() for n, p in model.named_parameters()}
        self.fixed = {n: p for n, p in all_params.items() if n not in self.wrt}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        def scalar_output(wrt, example):
            state = {**self.fixed, **wrt, **self.buffers}
            return functional_call(self.model, state, (example.unsqueeze(0),)).reshape(())

        per_example = vmap(grad(scalar_output), in_dims=(None, 0), chunk_size=self.chunk_size)
        grads = per_example(self.wrt, x.to(self.device))
        return self._assemble(grads, x.shape[0])


class HookFeatureComputer(FeatureComputer):
    """Per-layer batch gradients from one forward and one activation-only backward.

    Supports parameters owned by ``nn.Conv2d`` (any groups, incl. timm's ``Conv2dSame``),
    ``nn.Linear`` and eval-mode BatchNorm (incl. timm's ``BatchNormAct2d``). Models with other
    parameter-owning layers, shared parameters or re-used layers use
    :class:`FuncFeatureComputer` (see :func:`make_feature_computer`).
    """

    def __init__(self, model: nn.Module, subset: ParameterSubset):
        super().__init__(model, subset)
        unsupported = unsupported_modules(model, set(self.local_indices))
        if unsupported:
            raise ValueError("hook features do not support these layers: " + ", ".join(unsupported[:8]))
        owner = _parameter_owners(model)
        # module name -> the module, for each module owning a selected coordinate
        self.layers: dict[str, nn.Module] = {}
        for pname in self.local_indices:
            mname = owner[pname]
            self.layers[mname] = model.get_submodule(mname) if mname else model
        # In-place activations would overwrite the outputs whose gradients we need.
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        batch = x.shape[0]
        records: dict[str, dict] = {name: {} for name in self.layers}
        handles = []
        for name, module in self.layers.items():
            handles.extend(self._install_hooks(name, module, records[name]))
        try:
            with torch.enable_grad():
                out = self.model(x).reshape(batch)
                edges = [r["edge"] for r in records.values()]
                if any(r.get("calls", 0) != 1 for r in records.values()):
                    raise RuntimeError("a hooked layer ran more or less than once in one forward; "
                                       "use method='func' for this model")
                deltas = torch.autograd.grad(out.sum(), inputs=edges, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        grads: dict[str, torch.Tensor] = {}
        for (name, rec), delta in zip(records.items(), deltas):
            if delta is None:  # the layer does not influence the output: zero gradient
                delta = torch.zeros_like(rec["out"])
            grads.update(self._layer_grads(name, self.layers[name], rec["in"], delta.detach()))
        return self._assemble(grads, batch)

    # -- capture ---------------------------------------------------------------------------
    def _install_hooks(self, name: str, module: nn.Module, rec: dict) -> list:
        from torch.autograd.graph import get_gradient_edge

        def keep_output(out: torch.Tensor) -> None:
            # The gradient edge pins the value as produced here, even if a later op changes
            # the tensor in place (e.g. ResNet's `out += identity`).
            rec["edge"] = get_gradient_edge(out)
            rec["out"] = out.detach()

        def on_forward(mod, inputs, output):
            rec["calls"] = rec.get("calls", 0) + 1
            rec["in"] = inputs[0].detach()
            if not _is_norm_act(mod):
                keep_output(output)

        handles = [module.register_forward_hook(on_forward)]
        if _is_norm_act(module):  # timm BatchNormAct2d: the affine output is the input of .drop
            handles.append(module.drop.register_forward_hook(lambda m, i, o: keep_output(i[0])))
        return handles

    # -- per-example parameter gradients ---------------------------------------------------
    def _layer_grads(self, name: str, module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict:
        prefix = f"{name}." if name else ""
        batch = x.shape[0]
        out: dict[str, torch.Tensor] = {}
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
            dims = tuple(range(2, x.dim()))
            out[prefix + "weight"] = (delta * x_hat).sum(dims)
            out[prefix + "bias"] = delta.sum(dims)
        elif isinstance(module, nn.Linear):
            d2 = delta.reshape(batch, -1, delta.shape[-1])
            x2 = x.reshape(batch, -1, x.shape[-1])
            out[prefix + "weight"] = torch.bmm(d2.transpose(1, 2), x2)
            out[prefix + "bias"] = d2.sum(1)
        elif isinstance(module, nn.Conv2d):
            out[prefix + "weight"] = _conv2d_weight_grads(module, x, delta)
            out[prefix + "bias"] = delta.sum((2, 3))
        return {k: v for k, v in out.items() if k in self.local_indices}


def _conv2d_weight_grads(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-example ∂f/∂W (B, C_out, C_in/groups, kh, kw) = Σ_l δ[b, o, l] · unfold(x)[b, j, l]."""
    batch = x.shape[0]
    groups = module.groups
    kh, kw = module.kernel_size
    padding = module.padding
    if _is_conv2d_same(module):
        from timm.layers.padding import pad_same

        x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
        padding = (0, 0)
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported by hook features")
    if (kh, kw) == (1, 1) and module.stride == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(batch, x.shape[1], -1)  # a 1×1 conv is a matmul over positions
    else:
        cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
    length = cols.shape[-1]
    cols = cols.reshape(batch, groups, -1, length)
    d = delta.reshape(batch, groups, -1, length)
    grad = torch.matmul(d, cols.transpose(-1, -2))  # (B, groups, C_out/groups, C_in/groups·kh·kw)
    return grad.reshape(batch, *module.weight.shape)


def _is_norm_act(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(
        getattr(module, "drop", None), nn.Module) and hasattr(module, "act")


def _is_conv2d_same(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv2dSame"


def _parameter_owners(model: nn.Module) -> dict[str, str]:
    owners: dict[str, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owners.setdefault(full, mname)
    return owners


def unsupported_modules(model: nn.Module, param_names: set[str] | None = None) -> list[str]:
    """Layers owning (selected) parameters that :class:`HookFeatureComputer` cannot handle."""
    bad = []
    seen: dict[int, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
        if param_names is not None and not any(n in param_names for n in own):
            continue
        if not own:
            continue
        if id(module) in seen:
            bad.append(f"{mname} (shares a layer with {seen[id(module)]})")
            continue
        seen[id(module)] = mname
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is None or not module.affine:
                bad.append(f"{mname} (BatchNorm without running stats/affine)")
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d) and isinstance(module.padding, str) and not _is_conv2d_same(module):
                if module.padding != "valid":
                    bad.append(f"{mname} (conv padding={module.padding!r})")
        else:
            bad.append(f"{mname} ({type(module).__name__})")
    ids = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        if id(prm) in ids and (param_names is None or n in param_names or ids[id(prm)] in param_names):
            bad.append(f"{n} (parameter shared with {ids[id(prm)]})")
        ids.setdefault(id(prm), n)
    return bad


def make_feature_computer(model: nn.Module, subset: ParameterSubset, method: str = "auto",
                          chunk_size: int = 8) -> FeatureComputer:
    """``hooks`` (fast), ``func`` (generic reference) or ``auto`` (hooks when supported)."""
    if method == "func":
        return FuncFeatureComputer(model, subset, chunk_size=chunk_size)
    if method == "hooks":
        return HookFeatureComputer(model, subset)
    if method == "auto":
        if unsupported_modules(model, set(subset.per_parameter())):
            return FuncFeatureComputer(model, subset, chunk_size=chunk_size)
        return HookFeatureComputer(model, subset)
    raise ValueError(f"feature method must be auto, hooks or func; got {method!r}")


# --------------------------------------------------------------------------------------------
# Over datasets
# --------------------------------------------------------------------------------------------
def iterate_batches(dataset, indices: Iterable[int] | None = None, batch_size: int = 32,
                    num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Images of ``dataset`` (optionally a subset, in the given order) in batches."""
    from torch.utils.data import DataLoader, Subset

    if indices is not None:
        dataset = Subset(dataset, list(indices))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        persistent_workers=False)
    for images, _ in loader:
        yield images


def compute_features(computer: FeatureComputer, dataset, indices: Iterable[int] | None = None,
                     batch_size: int = 32, storage_dtype: str = "float32", num_workers: int = 0,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Φ for (a shard of) a dataset, on the CPU, in ``storage_dtype`` (computed in float32)."""
    from entk_ray.progress import progress_bar

    dtype = STORAGE_DTYPES[storage_dtype]
    total = len(indices) if indices is not None and hasattr(indices, "__len__") else len(dataset)
    out = torch.empty((total, computer.subset.p), dtype=dtype)
    row = 0
    with progress_bar(total=total, desc=desc, unit="ex", enabled=progress) as bar:
        for images in iterate_batches(dataset, indices, batch_size, num_workers):
            phi = computer(images)
            out[row:row + phi.shape[0]] = phi.to("cpu", dtype)
            row += phi.shape[0]
            bar.update(phi.shape[0])
    return out


@torch.no_grad()
def compute_embeddings(model: nn.Module, dataset, indices: Iterable[int] | None = None,
                       batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Penultimate features g_θ(x) (no gradient), for the linear probe."""
    device = next(model.parameters()).device
    chunks = [model.embed(images.to(device)).float().cpu()
              for images in iterate_batches(dataset, indices, batch_size, num_workers)]
    return torch.cat(chunks)
