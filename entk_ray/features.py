"""Per-example gradient features: the empirical NTK's feature map.

For a model with scalar output f(x) = wᵀ g_θ(x) the eNTK feature of an example is

    φ(x) = [∂f(x)/∂θ_k]_{k ∈ S}  ∈ R^p,

the gradient with respect to a fixed subset S of p parameter coordinates. The model is in eval
mode, so BatchNorm uses running statistics and φ(x) depends on x alone: features computed in any
batch, shard, process or machine agree.

Three pieces live here:

* :class:`ParameterSubset` — S, drawn once from (parameter names + shapes, p, seed) with a stable
  hash, so every shard and every evaluation set uses the same coordinates.
* :class:`FeatureComputer` — maps a batch of images to Φ ∈ R^{B×p}. Implementations:

  - :class:`FuncFeatureComputer`: ``torch.func.vmap(grad(f))`` over the batch, in chunks. Works for
    any model; memory is chunk × (#parameters owning a coordinate of S) floats.
  - :class:`SampledFeatureComputer` (the default): one batched forward and one backward *to the
    activations only*; then, per layer, only the sampled coordinates are formed from the layer
    input x and output gradient δ. A conv weight coordinate (o, c, i, j) is

        φ_b = Σ_l δ[b, o, l] · x̃[b, c, l shifted by (i, j)]

    (x̃: x padded, read with the conv's stride and dilation; grouped convs read channel
    group(o)·C_in/groups + c). Linear and BatchNorm coordinates are the analogous sums (see
    :class:`SampledFeatureComputer`). Extra cost: B × Σ_layers p_layer × L_layer multiply-adds
    (L: output positions), never a layer's full per-example gradient.
  - :class:`HookFeatureComputer`: one batched forward and one backward *to the activations only*;
    each layer's per-example parameter gradient is then formed from its input and output
    gradient (conv: ∂f/∂W_b = Σ_l δ_b[:, l] ⊗ unfold(x_b)[:, l]; linear: δ_b ⊗ x_b; BatchNorm
    affine: Σ δ_b · x̂_b and Σ δ_b). Because the examples are independent in eval mode,
    ∂(Σ_b f(x_b))/∂h_b = ∂f(x_b)/∂h_b for every activation h, so one backward gives every
    example's output gradients. Cost ≈ one forward + backward of the batch.

All return float32 and agree to round-off (tested). See docs/features.md for their cost and memory.

* :func:`compute_features` — Φ of (rows of) a dataset on the host, optionally stored as
  float16/bfloat16: decoding in persistent DataLoader workers, and on CUDA pinned batches in and
  double-buffered pinned copies out, so transfers overlap the computation.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


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
    return ParameterSubset(names=names, shapes=shapes, flat_indices=uniform_indices(names, shapes, p, seed),
                           seed=int(seed))


def layout_seed(names, shapes) -> int:
    """A seed from the parameters' names and shapes (the same model gives the same seed anywhere)."""
    layout = hashlib.sha256(repr(list(zip(names, shapes))).encode()).digest()
    return int.from_bytes(layout[:8], "little")


def uniform_indices(names, shapes, p: int, seed: int) -> np.ndarray:
    """p flat coordinates of the concatenated parameters, uniformly without replacement, sorted
    (all of them when p ≥ their number); the RNG is seeded with ``seed`` and :func:`layout_seed`."""
    total = int(sum(int(np.prod(s)) for s in shapes))
    if p >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([int(seed), layout_seed(names, shapes)])
    return np.sort(rng.choice(total, size=int(p), replace=False)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Feature computers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """Within the block, CUDA float32 matmuls and cuDNN convolutions use TF32 (10-bit mantissa
    products, float32 accumulation) when ``enabled``; otherwise nothing changes. CPU math is never
    affected. The previous settings are restored on exit."""
    if not enabled:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


class FeatureComputer(abc.ABC):
    """Maps a batch of inputs ``x`` (B, ...) to features Φ (B, p) of the scalar model output."""

    def __init__(self, model: nn.Module, subset: ParameterSubset, tf32: bool = False):
        if model.training:
            raise ValueError("features need the model in eval mode (call model.eval()): "
                             "in train mode BatchNorm mixes the examples of a batch")
        self.model = model
        self.subset = subset
        self.tf32 = bool(tf32)
        self.local_indices = subset.per_parameter()
        params = dict(model.named_parameters())
        missing = [n for n in subset.names if n not in params]
        if missing:
            raise ValueError(f"parameter subset names parameters the model lacks: {missing[:5]}")
        self.params = {n: params[n] for n in subset.names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def output_dim(self) -> int:
        """Columns of Φ (p for a subset; a projection's dimension for a projecting computer)."""
        return self.subset.p

    def _math_mode(self):
        """TF32 for CUDA matmuls and convolutions while Φ is computed, if asked (else unchanged)."""
        return tf32_mode(self.tf32 and self.device.type == "cuda")

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Φ for the batch, float32, shape (B, p), on the model's device.

        ``out``: where to write it (a float32 (B, p) tensor on the model's device whose rows are
        contiguous, e.g. a row slice of a dataset's Φ); returned. Saves an allocation per batch.
        """
        x = x.to(self.device, non_blocking=True)
        if out is not None:
            expected = (x.shape[0], self.output_dim)
            if tuple(out.shape) != expected or out.dtype != torch.float32 or out.device != x.device \
                    or (out.numel() and out.stride(1) != 1):
                raise ValueError(f"out must be a float32 tensor of shape {expected} on {x.device} with contiguous "
                                 f"rows; got {out.dtype} {tuple(out.shape)} on {out.device}")
        with self._math_mode():
            return self._features(x, out)

    @abc.abstractmethod
    def _features(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Φ of a batch already on the model's device (see :meth:`__call__`)."""

    def _assemble(self, grads: dict[str, torch.Tensor], batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather S's coordinates from per-parameter per-example gradients (B, *shape) into Φ."""
        device = next(iter(grads.values())).device
        if out is None:
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

    def __init__(self, model: nn.Module, subset: ParameterSubset, chunk_size: int = 8, tf32: bool = False):
        super().__init__(model, subset, tf32=tf32)
        self.chunk_size = int(chunk_size)
        self.buffers = dict(model.named_buffers())
        self.wrt = {n: p.detach() for n, p in self.params.items() if n in self.local_indices}
        all_params = {n: p.detach() for n, p in model.named_parameters()}
        self.fixed = {n: p for n, p in all_params.items() if n not in self.wrt}

    def _features(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        def scalar_output(wrt, example):
            state = {**self.fixed, **wrt, **self.buffers}
            return functional_call(self.model, state, (example.unsqueeze(0),)).reshape(())

        per_example = vmap(grad(scalar_output), in_dims=(None, 0), chunk_size=self.chunk_size)
        return self._assemble(per_example(self.wrt, x), x.shape[0], out)


class HookFeatureComputer(FeatureComputer):
    """Per-layer batch gradients from one forward and one activation-only backward.

    Supports parameters owned by ``nn.Conv2d`` (any groups, incl. timm's ``Conv2dSame``),
    ``nn.Linear`` and eval-mode BatchNorm (incl. timm's ``BatchNormAct2d``). Models with other
    parameter-owning layers, shared parameters or re-used layers use
    :class:`FuncFeatureComputer` (see :func:`make_feature_computer`).
    """

    method_name = "hooks"

    def __init__(self, model: nn.Module, subset: ParameterSubset, tf32: bool = False):
        super().__init__(model, subset, tf32=tf32)
        unsupported = unsupported_modules(model, set(self.local_indices))
        if unsupported:
            raise ValueError(f"{self.method_name} features do not support these layers: " + ", ".join(unsupported[:8]))
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

    def _capture(self, x: torch.Tensor) -> tuple[dict[str, dict], tuple[torch.Tensor | None, ...]]:
        """One hooked forward and one backward to the hooked layers' outputs: per layer its input
        (``records[name]["in"]``) and δ = ∂f/∂(layer output) per example (None: the layer does not
        influence the output)."""
        batch = x.shape[0]
        records: dict[str, dict] = {name: {} for name in self.layers}
        handles = []
        for name, module in self.layers.items():
            handles.extend(self._install_hooks(name, module, records[name]))
        try:
            with torch.enable_grad():
                y = self.model(x).reshape(batch)
                edges = [r["edge"] for r in records.values()]
                if any(r.get("calls", 0) != 1 for r in records.values()):
                    raise RuntimeError("a hooked layer ran more or less than once in one forward; "
                                       "use method='func' for this model")
                deltas = torch.autograd.grad(y.sum(), inputs=edges, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return records, deltas

    def _features(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        batch = x.shape[0]
        records, deltas = self._capture(x)
        grads: dict[str, torch.Tensor] = {}
        for (name, rec), delta in zip(records.items(), deltas):
            if delta is None:  # the layer does not influence the output: zero gradient
                delta = torch.zeros_like(rec["out"])
            grads.update(self._layer_grads(name, self.layers[name], rec["in"], delta.detach()))
        return self._assemble(grads, batch, out)

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
            per_position = (delta * x_hat).reshape(batch, x.shape[1], -1)  # (B, C) inputs have one position
            out[prefix + "weight"] = per_position.sum(-1)
            out[prefix + "bias"] = delta.reshape(batch, x.shape[1], -1).sum(-1)
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
    if module.padding_mode != "zeros":  # the forward pads explicitly, then convolves unpadded
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    elif _is_conv2d_same(module):
        from timm.layers.padding import pad_same

        x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
        padding = (0, 0)
    if padding == "same":  # total d·(k−1) per side pair, the extra one last (as F.conv2d does)
        th, tw = module.dilation[0] * (kh - 1), module.dilation[1] * (kw - 1)
        x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    if (kh, kw) == (1, 1) and module.stride == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(batch, x.shape[1], -1)  # a 1×1 conv is a matmul over positions
    else:
        cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
    length = cols.shape[-1]
    cols = cols.reshape(batch, groups, -1, length)
    d = delta.reshape(batch, groups, -1, length)
    grad = torch.matmul(d, cols.transpose(-1, -2))  # (B, groups, C_out/groups, C_in/groups·kh·kw)
    return grad.reshape(batch, *module.weight.shape)


# --------------------------------------------------------------------------------------------
# Only the sampled coordinates
# --------------------------------------------------------------------------------------------
class SampledFeatureComputer(HookFeatureComputer):
    """Φ from one forward, one activation-only backward and the sampled products alone.

    The forward records each hooked layer's input x; a hook on its output receives δ = ∂(Σ_b f)/∂out
    during the one backward (to the activations only: no parameter gradient is formed), and
    writes the layer's columns of Φ right there. Per example b, with l over output positions:

    * conv weight (o, c, i, j), stride s, dilation d, padding (p_h, p_w), g = group of o:
      ``Σ_l δ[b, o, l] · x[b, g·C_in/groups + c, s_h·h_l + d_h·i − p_h, s_w·w_l + d_w·j − p_w]``
      (zero outside x; timm's ``Conv2dSame`` and ``padding='same'`` pad as their forward does);
      conv bias o: ``Σ_l δ[b, o, l]``;
    * linear weight (o, i): ``Σ_t δ[b, t, o] · x[b, t, i]`` over the leading token dims t; bias o: ``Σ_t δ[b, t, o]``;
    * eval-mode BatchNorm weight c: ``Σ_l δ[b, c, l] · (x[b, c, l] − μ_c)/√(σ²_c + ε)``; bias c: ``Σ_l δ[b, c, l]``.

    Cost beyond forward + activation backward: B × Σ_layers p_layer × L_layer multiply-adds.
    Memory beyond the backward's own: Φ (B × p) and, on the torch path, one transposed copy of
    the current layer's x and δ plus two gathered chunks of at most ``chunk_elements`` values
    each; nothing scales with a layer's parameter count.

    Two implementations of the conv-weight sum, equal to round-off (tested):

    * ``torch`` (any device): x (zero-padded) and δ are laid out batch-innermost, (C, H_p, W_p, B)
      and (O, L·B), so every value a coordinate needs at one position is a contiguous run of B.
      Coordinates stay in Φ's column order (sorted by output channel, so δ rows are read in
      order); a chunk of them is one gather of x rows (row c·H_p·W_p + (s_h·h + d_h·i)·W_p +
      s_w·w + d_w·j; for a pointwise conv simply row c of length L·B), one gather of δ rows,
      a product and a sum over l, written to consecutive columns. On this project's CPU that
      beat grouping by kernel offset (strided views), padded per-output-channel batches,
      per-coordinate advanced indexing and the dense per-layer gradient; see docs/features.md.
    * ``triton`` (CUDA, float32): one fused kernel reads x and δ in their own layout through
      the coordinate arrays, so nothing is gathered into memory; one program per (block of
      coordinates, example), coordinates in Φ's column order (sorted by output channel, so a
      block shares δ rows).

    ``conv_backend``: ``auto`` (triton on CUDA when importable, else torch), ``torch`` or
    ``triton``. Supports the layers :class:`HookFeatureComputer` does.
    """

    method_name = "sampled"

    def __init__(self, model: nn.Module, subset: ParameterSubset, tf32: bool = False,
                 chunk_elements: int | None = None, conv_backend: str = "auto"):
        super().__init__(model, subset, tf32=tf32)
        if conv_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"conv_backend must be auto, torch or triton; got {conv_backend!r}")
        if chunk_elements is not None and (isinstance(chunk_elements, bool) or int(chunk_elements) < 1):
            raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
        self.conv_backend = conv_backend
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self._buffers: dict = {}  # chunk buffers reused by every call
        columns = _parameter_columns(subset)
        self.plans: dict[str, _LayerPlan] = {}
        for mname, module in self.layers.items():
            prefix = f"{mname}." if mname else ""
            blocks = {kind: _Block(columns[prefix + kind], self.local_indices[prefix + kind])
                      for kind in ("weight", "bias") if prefix + kind in self.local_indices}
            self.plans[mname] = _make_plan(module, blocks)

    def _conv_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.conv_backend == "torch":
            return "torch"
        usable = device.type == "cuda" and dtype == torch.float32 and _triton_available()
        if self.conv_backend == "triton":
            if not _triton_available():
                raise RuntimeError("conv_backend='triton' but triton cannot be imported")
            return "triton"
        return "triton" if usable else "torch"

    def _chunk(self, device: torch.device) -> int:
        if self.chunk_elements is not None:
            return self.chunk_elements
        # CPU: two 1 MiB float32 chunks stay in cache and reuse the allocator's memory (larger
        # gathers were 10× slower per value here, page faults included). GPU: 64 MiB chunks.
        return 1 << 18 if device.type == "cpu" else 1 << 24

    def _features(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        from torch.autograd.graph import get_gradient_edge

        batch = x.shape[0]
        if out is None:
            out = torch.empty((batch, self.subset.p), dtype=torch.float32, device=x.device)
        ctx = _ProductContext(out, self._chunk(x.device), self._conv_backend(x.device, x.dtype), self._buffers)
        written: set[str] = set()
        calls = {name: 0 for name in self.layers}
        edges: list = []
        handles: list = []

        def watch(name: str, layer_input: torch.Tensor, output: torch.Tensor) -> None:
            plan = self.plans[name]

            def on_gradient(delta: torch.Tensor) -> None:
                plan.compute(layer_input, delta.detach(), ctx)
                written.add(name)

            # A tensor hook fires during the backward with δ for the value as produced here, even
            # if a later op changes the tensor in place (ResNet's `out += identity`).
            handles.append(output.register_hook(on_gradient))
            edges.append(get_gradient_edge(output))

        norm_inputs: dict[str, torch.Tensor] = {}

        def forward_hook(name: str):
            def on_forward(module, inputs, output):
                calls[name] += 1
                watch(name, inputs[0].detach(), output)
            return on_forward

        def norm_act_pre_hook(name: str):
            def on_norm_input(module, inputs):
                calls[name] += 1
                norm_inputs[name] = inputs[0].detach()
            return on_norm_input

        def drop_hook(name: str):
            def on_drop(module, inputs, output):  # timm BatchNormAct2d: the affine output enters .drop
                watch(name, norm_inputs.pop(name), inputs[0])
            return on_drop

        for name, module in self.layers.items():
            if _is_norm_act(module):
                handles.append(module.register_forward_pre_hook(norm_act_pre_hook(name)))
                handles.append(module.drop.register_forward_hook(drop_hook(name)))
            else:
                handles.append(module.register_forward_hook(forward_hook(name)))
        try:
            with torch.enable_grad():
                y = self.model(x).reshape(batch)
                if any(n != 1 for n in calls.values()):
                    raise RuntimeError("a hooked layer ran more or less than once in one forward; "
                                       "use method='func' for this model")
                # inputs=edges: the backward runs down to the layer outputs and skips every
                # parameter gradient; δ reaches the hooks above on its way and is dropped after
                # (backward, unlike autograd.grad, keeps none of them to return).
                torch.autograd.backward(y.sum(), inputs=edges)
        finally:
            for h in handles:
                h.remove()
        for name, plan in self.plans.items():
            if name not in written:  # the layer does not influence the output: zero gradient
                for block in (plan.weight, plan.bias):
                    if block is not None:
                        out[:, block.start:block.stop] = 0
        return out


@dataclass(frozen=True)
class _Block:
    """One parameter's sampled coordinates: local flat ``index`` (sorted), in Φ columns from ``start``."""

    start: int
    index: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + int(self.index.numel())


@dataclass
class _ProductContext:
    """Where a backward's products go (Φ, (B, p)) and how they are formed."""

    out: torch.Tensor
    chunk: int
    conv_backend: str
    buffers: dict = field(default_factory=dict)  # (dtype, device) -> flat chunk buffers, kept across calls

    def workspace(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Flat buffers of ≥ ``size`` values: x gather, δ gather, sums, and row indices (int64)."""
        key = (dtype, str(device))
        bufs = self.buffers.get(key)
        if bufs is None or bufs[0].numel() < size:
            size = max(size, self.chunk if bufs is None else bufs[0].numel())
            bufs = tuple(torch.empty(size, dtype=dtype, device=device) for _ in range(3))
            bufs += (torch.empty(size, dtype=torch.long, device=device),)
            self.buffers[key] = bufs
        return bufs


def _parameter_columns(subset: ParameterSubset) -> dict[str, int]:
    """First Φ column of each parameter's coordinates (they are contiguous, in subset order)."""
    starts, col = {}, 0
    for name, idx in subset.per_parameter().items():
        starts[name] = col
        col += idx.numel()
    return starts


class _LayerPlan:
    """A layer's sampled coordinates, decoded once; ``compute`` writes its columns of Φ."""

    def __init__(self, module: nn.Module, blocks: dict[str, _Block]):
        self.module = module
        self.weight = blocks.get("weight")
        self.bias = blocks.get("bias")
        self._device_cache: dict = {}

    def on(self, device: torch.device) -> dict:
        """The coordinate tensors on ``device`` (moved once)."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = {k: v.to(device) for k, v in self.tensors().items()}
        return self._device_cache[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute(self, x: torch.Tensor, delta: torch.Tensor, ctx: _ProductContext) -> None:
        raise NotImplementedError


class _NormPlan(_LayerPlan):
    """Eval-mode BatchNorm: gathers the sampled channels only, (B, S, positions)."""

    def tensors(self):
        wc = self.weight.index if self.weight is not None else torch.empty(0, dtype=torch.long)
        bc = self.bias.index if self.bias is not None else torch.empty(0, dtype=torch.long)
        channels = torch.unique(torch.cat([wc, bc]))
        return {"channels": channels, "wpos": torch.searchsorted(channels, wc),
                "bpos": torch.searchsorted(channels, bc)}

    def compute(self, x, delta, ctx):
        t = self.on(x.device)
        m = self.module
        d = delta.index_select(1, t["channels"])
        d = d.reshape(d.shape[0], d.shape[1], -1)
        if self.bias is not None:
            ctx.out[:, self.bias.start:self.bias.stop] = d.sum(-1).index_select(1, t["bpos"])
        if self.weight is not None:
            ch = t["channels"]
            xs = x.index_select(1, ch).reshape(d.shape)
            shift = m.running_mean.index_select(0, ch).to(xs.dtype).unsqueeze(-1)
            scale = torch.rsqrt(m.running_var.index_select(0, ch) + m.eps).to(xs.dtype).unsqueeze(-1)
            x_hat = (xs - shift).mul_(scale)
            ctx.out[:, self.weight.start:self.weight.stop] = (x_hat * d).sum(-1).index_select(1, t["wpos"])


class _LinearPlan(_LayerPlan):
    """nn.Linear on (B, *, I): tokens t play the role of positions l."""

    def tensors(self):
        in_features = self.module.in_features
        out = {}
        if self.weight is not None:
            out["o"] = self.weight.index // in_features
            out["i"] = self.weight.index % in_features
        if self.bias is not None:
            out["ob"] = self.bias.index
        return out

    def compute(self, x, delta, ctx):
        t = self.on(x.device)
        batch = x.shape[0]
        tokens = x.numel() // (batch * x.shape[-1])
        d_rows = _batch_innermost(delta.reshape(batch, tokens, -1).transpose(1, 2))  # (O, T·B)
        if self.bias is not None:
            bias = d_rows.index_select(0, t["ob"]).view(-1, tokens, batch).sum(1)
            ctx.out[:, self.bias.start:self.bias.stop] = bias.t()
        if self.weight is not None:
            x_rows = _batch_innermost(x.reshape(batch, tokens, -1).transpose(1, 2))  # (I, T·B)
            _row_products(x_rows, t["i"], d_rows, t["o"], tokens, batch, ctx, self.weight.start)


class _ConvPlan(_LayerPlan):
    """nn.Conv2d (any groups, stride, dilation, padding incl. 'same', padding_mode; timm Conv2dSame)."""

    def __init__(self, module, blocks):
        super().__init__(module, blocks)
        self._offsets: dict = {}

    def tensors(self):
        m = self.module
        out_ch, cg, kh, kw = m.weight.shape
        out = {}
        if self.weight is not None:
            idx = self.weight.index
            o = idx // (cg * kh * kw)
            rest = idx % (cg * kh * kw)
            c = (o // (out_ch // m.groups)) * cg + rest // (kh * kw)
            i = (rest % (kh * kw)) // kw
            j = rest % kw
            out.update(o=o, c=c, i=i, j=j)
            out["coords32"] = torch.stack([o, c, i, j]).to(torch.int32)  # triton
        if self.bias is not None:
            out["ob"] = self.bias.index
        return out

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) zero padding of the layer input as the conv's forward applies it."""
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        if _is_conv2d_same(m):
            from timm.layers.padding import get_same_padding

            return get_same_padding(height, kh, sh, dh) // 2, get_same_padding(width, kw, sw, dw) // 2
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return 0, 0
            return (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2  # 'same': the extra pad goes last
        return int(m.padding[0]), int(m.padding[1])

    def compute(self, x, delta, ctx):
        t = self.on(x.device)
        m = self.module
        if m.padding_mode != "zeros":  # the forward pads explicitly, then convolves unpadded
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            top, left = 0, 0
        else:
            top, left = self.padding(x.shape[-2], x.shape[-1])
        batch, out_ch, out_h, out_w = delta.shape
        length = out_h * out_w
        d_rows = None
        if self.bias is not None:
            d_rows = _batch_innermost(delta)
            bias = d_rows.index_select(0, t["ob"]).view(-1, length, batch).sum(1)
            ctx.out[:, self.bias.start:self.bias.stop] = bias.t()
        if self.weight is None:
            return
        if ctx.conv_backend == "triton":
            _conv_weight_triton(x, delta, t["coords32"], m, top, left, ctx.out, self.weight.start)
            return
        if d_rows is None:
            d_rows = _batch_innermost(delta)
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        if (kh, kw, sh, sw, top, left) == (1, 1, 1, 1, 0, 0):  # pointwise: x's rows are the coordinate's rows
            _row_products(_batch_innermost(x), t["c"], d_rows, t["o"], length, batch, ctx, self.weight.start)
            return
        # Batch-innermost, zero-padded x: (C, H_p, W_p, B), read as rows of B values. Coordinate k
        # at output position (h, w) reads row c·H_p·W_p + (s_h·h + d_h·i)·W_p + s_w·w + d_w·j.
        channels, height, width = x.shape[1:]
        pad_h = max((out_h - 1) * sh + (kh - 1) * dh + 1, top + height)
        pad_w = max((out_w - 1) * sw + (kw - 1) * dw + 1, left + width)
        x_t = x.new_zeros((channels, pad_h, pad_w, batch))
        x_t[:, top:top + height, left:left + width] = x.permute(1, 2, 3, 0)
        key = (pad_h, pad_w, out_h, out_w, str(x.device))
        if key not in self._offsets:
            base = (t["c"] * pad_h + t["i"] * dh) * pad_w + t["j"] * dw
            rows = torch.arange(out_h, device=x.device) * (sh * pad_w)
            shifts = (rows[:, None] + torch.arange(out_w, device=x.device) * sw).reshape(-1)
            self._offsets = {key: (base, shifts)}  # one input size at a time
        base, shifts = self._offsets[key]
        _row_products(x_t.view(-1, batch), base, d_rows, t["o"], length, batch, ctx, self.weight.start, shifts)


def _batch_innermost(t: torch.Tensor) -> torch.Tensor:
    """(B, R, *positions) → contiguous (R, positions·B): row r holds every position's B values.

    Always a copy: gathers from a non-contiguous view (what reshape returns for one position)
    run an order of magnitude slower.
    """
    batch, rows = t.shape[0], t.shape[1]
    return t.reshape(batch, rows, -1).permute(1, 2, 0).contiguous().view(rows, -1)


def _make_plan(module: nn.Module, blocks: dict[str, _Block]) -> _LayerPlan:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        plan = _NormPlan(module, blocks)
    elif isinstance(module, nn.Linear):
        plan = _LinearPlan(module, blocks)
    elif isinstance(module, nn.Conv2d):
        plan = _ConvPlan(module, blocks)
    else:  # unsupported_modules() rejects these before we get here
        raise ValueError(f"no sampled-feature plan for {type(module).__name__}")
    plan.on(torch.device("cpu"))  # decode once, up front
    return plan


def _row_products(x_rows: torch.Tensor, x_index: torch.Tensor, d_rows: torch.Tensor, d_index: torch.Tensor,
                  length: int, batch: int, ctx: "_ProductContext", col0: int,
                  shifts: torch.Tensor | None = None) -> None:
    """Φ[b, col0 + k] = Σ_l X_k[l, b] · d_rows[d_index[k]][l, b], at most ``ctx.chunk`` values at a time.

    Without ``shifts``, X_k = x_rows[x_index[k]] with x_rows (N, L·B); with them, x_rows is
    (N, B) and X_k[l] = x_rows[x_index[k] + shifts[l]]. ``d_rows`` is (M, L·B). Every gather reads
    whole runs of B (or L·B) contiguous values, into the context's reused chunk buffers (fresh
    large temporaries cost page faults on every call on the CPU).
    """
    k_total = int(x_index.numel())
    row = length * batch
    step = max(1, ctx.chunk // max(1, row))
    xbuf, dbuf, sbuf, ibuf = ctx.workspace(max(1, min(step, k_total)) * row, x_rows.dtype, x_rows.device)
    for s in range(0, k_total, step):
        e = min(k_total, s + step)
        n = e - s
        if shifts is None:
            xs = torch.index_select(x_rows, 0, x_index[s:e], out=xbuf[:n * row].view(n, row))
        else:
            flat = torch.add(x_index[s:e, None], shifts, out=ibuf[:n * length].view(n, length))
            xs = torch.index_select(x_rows, 0, flat.view(-1), out=xbuf[:n * row].view(n * length, batch))
            xs = xs.view(n, row)
        prod = xs.mul_(torch.index_select(d_rows, 0, d_index[s:e], out=dbuf[:n * row].view(n, row)))
        if length == 1:
            part = prod
        else:
            part = torch.sum(prod.view(n, length, batch), 1, out=sbuf[:n * batch].view(n, batch))
        ctx.out[:, col0 + s:col0 + e] = part.t()


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or no usable backend
        return False
    return True


@functools.lru_cache(maxsize=1)
def _triton_conv_kernel():
    """The fused sampled conv-weight kernel (built on first use, so importing stays cheap)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sampled_conv_weight(x_ptr, d_ptr, out_ptr, coords_ptr, n_coords,
                            channels, height, width, out_channels, out_w, length,
                            stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_row, col0,
                            BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
        # out[b, col0 + k] = Σ_l δ[b, o_k, l] · x[b, c_k, s_h·h_l + d_h·i_k − top, s_w·w_l + d_w·j_k − left]
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < n_coords
        o = tl.load(coords_ptr + ks, mask=kmask, other=0)
        c = tl.load(coords_ptr + n_coords + ks, mask=kmask, other=0)
        ki = tl.load(coords_ptr + 2 * n_coords + ks, mask=kmask, other=0)
        kj = tl.load(coords_ptr + 3 * n_coords + ks, mask=kmask, other=0)
        x_rows = x_ptr + (b * channels + c.to(tl.int64)) * (height * width)
        d_rows = d_ptr + (b * out_channels + o.to(tl.int64)) * length
        h0 = ki * dil_h - pad_top
        w0 = kj * dil_w - pad_left
        acc = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)  # reduced over l once, at the end
        for l0 in range(0, length, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            lmask = ls < length
            oh = ls // out_w
            ow = ls - oh * out_w
            ih = h0[:, None] + (oh * stride_h)[None, :]
            iw = w0[:, None] + (ow * stride_w)[None, :]
            valid = kmask[:, None] & lmask[None, :]
            inside = valid & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            xv = tl.load(x_rows[:, None] + ih * width + iw, mask=inside, other=0.0)
            dv = tl.load(d_rows[:, None] + ls[None, :], mask=valid, other=0.0)
            acc += xv.to(tl.float32) * dv.to(tl.float32)
        tl.store(out_ptr + b * out_row + col0 + ks, tl.sum(acc, axis=1), mask=kmask)

    return sampled_conv_weight


def _triton_blocks(length: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_L): a ~2,048-value tile, long along l where the layer has many positions."""
    block_l = min(128, max(16, 1 << max(0, (length - 1).bit_length())))
    return max(16, min(128, 2048 // block_l)), block_l


def _conv_weight_triton(x, delta, coords32, m, top, left, out, col0) -> None:
    """Sampled conv-weight sums with the fused kernel, written into ``out[:, col0:col0 + K]``."""
    import triton

    x = x.contiguous()
    delta = delta.contiguous()
    batch, channels, height, width = x.shape
    _, out_channels, out_h, out_w = delta.shape
    n_coords = int(coords32.shape[1])
    block_k, block_l = _triton_blocks(out_h * out_w)
    grid = (triton.cdiv(n_coords, block_k), batch)
    _triton_conv_kernel()[grid](
        x, delta, out, coords32, n_coords, channels, height, width, out_channels, out_w, out_h * out_w,
        m.stride[0], m.stride[1], m.dilation[0], m.dilation[1], top, left, out.stride(0), col0,
        BLOCK_K=block_k, BLOCK_L=block_l)


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
    """Layers owning (selected) parameters that the sampled and hook computers cannot handle.

    Supported: ``nn.Conv2d`` (any groups, stride, dilation, padding and padding_mode; timm's
    ``Conv2dSame``), ``nn.Linear`` and BatchNorm with running statistics and affine parameters
    (timm's ``BatchNormAct2d`` too), each owning its parameters alone and run once per forward.
    """
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
            pass
        else:
            bad.append(f"{mname} ({type(module).__name__})")
    ids = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        if id(prm) in ids and (param_names is None or n in param_names or ids[id(prm)] in param_names):
            bad.append(f"{n} (parameter shared with {ids[id(prm)]})")
        ids.setdefault(id(prm), n)
    return bad


FEATURE_COMPUTERS = ("auto", "sampled", "hooks", "func")


def make_feature_computer(model: nn.Module, subset: ParameterSubset, method: str = "auto",
                          chunk_size: int = 8, tf32: bool = False) -> FeatureComputer:
    """``sampled`` (fast, the default), ``hooks``, ``func`` (generic reference) or ``auto``.

    ``auto`` is ``sampled`` unless the model has layers it cannot handle (see
    :func:`unsupported_modules`); then it logs why and uses ``func``.
    """
    if method not in FEATURE_COMPUTERS:
        raise ValueError(f"feature method must be one of {', '.join(FEATURE_COMPUTERS)}; got {method!r}")
    if method == "func":
        return FuncFeatureComputer(model, subset, chunk_size=chunk_size, tf32=tf32)
    if method == "hooks":
        return HookFeatureComputer(model, subset, tf32=tf32)
    if method == "auto":
        unsupported = unsupported_modules(model, set(subset.per_parameter()))
        if unsupported:
            log.warning("features: the sampled computer cannot handle %s%s; using func (torch.func vmap(grad), "
                        "slower)", ", ".join(unsupported[:8]), " ..." if len(unsupported) > 8 else "")
            return FuncFeatureComputer(model, subset, chunk_size=chunk_size, tf32=tf32)
    return SampledFeatureComputer(model, subset, tf32=tf32)


# --------------------------------------------------------------------------------------------
# Over datasets
# --------------------------------------------------------------------------------------------
class _RowBatches:
    """Batch sampler over a row list that can be re-pointed between passes (it runs in the main
    process, so persistent DataLoader workers keep serving new rows)."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self.rows: list[int] = []
        self.busy = False  # a pass over the loader is under way

    def __iter__(self):
        for s in range(0, len(self.rows), self.batch_size):
            yield self.rows[s:s + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


# (id(dataset), batch_size, num_workers, pin_memory) -> (dataset, loader, sampler); a few at most.
_LOADERS: dict[tuple, tuple] = {}
_MAX_LOADERS = 4


def iterate_batches(dataset, indices: Iterable[int] | None = None, batch_size: int = 32,
                    num_workers: int = 0, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Images of ``dataset`` (optionally the rows ``indices``, in that order) in batches.

    ``num_workers > 0`` decodes in that many DataLoader worker processes, kept alive across calls
    for the same dataset (``persistent_workers``; the loader is cached and its sampler re-pointed
    at the new rows), so computing shard after shard does not respawn workers. ``pin_memory``:
    batches arrive in page-locked memory, ready for non-blocking host→GPU copies (CUDA only).
    """
    from torch.utils.data import DataLoader

    rows = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    pin_memory = bool(pin_memory) and torch.cuda.is_available()
    key = (id(dataset), int(batch_size), int(num_workers), pin_memory)
    if num_workers > 0 and not (key in _LOADERS and _LOADERS[key][2].busy):
        if key not in _LOADERS:
            while len(_LOADERS) >= _MAX_LOADERS:
                _LOADERS.pop(next(iter(_LOADERS)))  # its workers stop with the loader
            sampler = _RowBatches(batch_size)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                persistent_workers=True)
            _LOADERS[key] = (dataset, loader, sampler)
        _, loader, sampler = _LOADERS[key]
    else:  # no workers, or the cached loader is in the middle of another pass: a loader for this pass
        sampler = _RowBatches(batch_size)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
    sampler.rows = rows
    sampler.busy = True
    try:
        for images, _ in loader:
            yield images
    finally:
        sampler.busy = False


class _HostStager:
    """Moves Φ batches from the device into host ``out`` (rows × p, storage dtype).

    CUDA: each batch is cast to the storage dtype on the GPU and copied, on a side stream and
    non-blocking, into one of two pinned host buffers; the host copies a buffer into ``out`` only
    when the buffer comes round again (or at :meth:`finish`), so the copy of batch t overlaps the
    computation of batch t+1. CPU (``staged=False``): a plain copy into ``out``.
    """

    def __init__(self, out: torch.Tensor, device: torch.device, batch_size: int, staged: bool | None = None,
                 cache: dict | None = None):
        self.out = out
        self.device = device
        self.staged = (device.type == "cuda") if staged is None else bool(staged)
        self.pending: list = [None, None]
        self.count = 0
        if not self.staged:
            return
        cuda = device.type == "cuda"
        shape = (int(batch_size), out.shape[1])
        key = (shape, out.dtype, str(device))
        cache = {} if cache is None else cache
        if key not in cache:  # pinning is slow: keep the buffers with the feature computer
            cache.clear()
            cache[key] = [torch.empty(shape, dtype=out.dtype, pin_memory=cuda) for _ in range(2)]
        self.buffers = cache[key]
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]

    def put(self, phi: torch.Tensor, row: int) -> None:
        n = phi.shape[0]
        if not self.staged:
            self.out[row:row + n] = phi.to("cpu", self.out.dtype)
            return
        slot = self.count % 2
        self._drain(slot)
        phi = phi.to(self.out.dtype)
        target = self.buffers[slot][:n]
        if self.stream is None:
            target.copy_(phi)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                target.copy_(phi, non_blocking=True)
                self.events[slot].record(self.stream)
            phi.record_stream(self.stream)  # keep phi's memory until the copy has run
        self.pending[slot] = (row, n)
        self.count += 1

    def _drain(self, slot: int) -> None:
        if self.pending[slot] is None:
            return
        row, n = self.pending[slot]
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        self.out[row:row + n] = self.buffers[slot][:n]
        self.pending[slot] = None

    def finish(self) -> torch.Tensor:
        for k in range(2):  # oldest first
            self._drain((self.count + k) % 2)
        return self.out


def storage_kernel_error(phi: torch.Tensor, storage_dtype: str) -> float:
    """Relative error of a kernel block from Φ stored in ``storage_dtype``:
    ‖Φ̃Φ̃ᵀ − ΦΦᵀ‖_F / ‖ΦΦᵀ‖_F with Φ̃ = Φ rounded to the storage dtype, both products in float64
    (on Φ's device). 0 for float32 storage; pass a sample of float32 Φ, e.g. the first batch."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}; got {storage_dtype!r}")
    exact = phi.detach().to(torch.float64)
    rounded = phi.detach().to(STORAGE_DTYPES[storage_dtype]).to(torch.float64)
    k_exact = exact @ exact.T
    norm = torch.linalg.matrix_norm(k_exact).item()
    if norm == 0.0:
        return 0.0
    return torch.linalg.matrix_norm(rounded @ rounded.T - k_exact).item() / norm


def compute_features(computer: FeatureComputer, dataset, indices: Iterable[int] | None = None,
                     batch_size: int = 32, storage_dtype: str = "float32", num_workers: int = 0,
                     progress: bool = False, desc: str = "features", stats: dict | None = None) -> torch.Tensor:
    """Φ for (a shard of) a dataset, on the CPU, in ``storage_dtype`` (computed in float32).

    On CUDA, decoded batches arrive pinned (:func:`iterate_batches`) and Φ leaves the GPU through
    double-buffered pinned copies (:class:`_HostStager`), so neither transfer stalls the GPU; on
    the CPU, float32 Φ is written straight into its rows of the result. ``stats``, when given, is
    filled with ``examples``, ``seconds``, ``examples_per_s`` and ``storage_kernel_rel_error``
    (:func:`storage_kernel_error` on the first batch; 0.0 for float32 storage).
    """
    from entk_ray.progress import progress_bar

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}; got {storage_dtype!r}")
    start = time.perf_counter()
    dtype = STORAGE_DTYPES[storage_dtype]
    rows = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    out = torch.empty((len(rows), computer.output_dim), dtype=dtype)
    device = computer.device
    direct = device.type == "cpu" and dtype == torch.float32
    stager = _HostStager(out, device, batch_size, cache=computer.__dict__.setdefault("_staging_buffers", {}))
    row = 0
    error = 0.0
    with progress_bar(total=len(rows), desc=desc, unit="ex", enabled=progress) as bar:
        for images in iterate_batches(dataset, rows, batch_size, num_workers, pin_memory=device.type == "cuda"):
            n = images.shape[0]
            if direct:
                computer(images, out=out[row:row + n])
            else:
                phi = computer(images)
                if row == 0 and dtype != torch.float32:
                    error = storage_kernel_error(phi, storage_dtype)
                stager.put(phi, row)
            row += n
            bar.update(n)
    stager.finish()
    if stats is not None:
        seconds = time.perf_counter() - start
        stats.update(examples=len(rows), seconds=seconds, examples_per_s=len(rows) / max(seconds, 1e-12),
                     storage_kernel_rel_error=error)
    return out


def peak_memory_bytes(fn, device: torch.device | str = "cpu") -> int | None:
    """Peak memory ``fn()`` adds on ``device``, in bytes, or None where it cannot be measured.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU
    (Linux): growth of the process's peak resident set (VmHWM) over its resident set before the
    call, after handing freed heap pages back (glibc ``malloc_trim``) and resetting the peak
    through ``/proc/self/clear_refs``. It counts every page the call touches, torch's or not.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)

    def status_kib(field_name: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field_name} missing from /proc/self/status")

    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reuse is not mistaken for no use
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident set
        base = status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, status_kib("VmHWM") - base) * 1024


@torch.no_grad()
def compute_embeddings(model: nn.Module, dataset, indices: Iterable[int] | None = None,
                       batch_size: int = 64, num_workers: int = 0) -> torch.Tensor:
    """Penultimate features g_θ(x) (no gradient), for the linear probe."""
    device = next(model.parameters()).device
    chunks = [model.embed(images.to(device)).float().cpu()
              for images in iterate_batches(dataset, indices, batch_size, num_workers)]
    return torch.cat(chunks)
