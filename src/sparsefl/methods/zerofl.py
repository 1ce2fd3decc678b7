"""ZeroFL: SWAT local sparsity on every client and sparse uploads (Qiu et al., ICLR 2022).

ZeroFL ("ZeroFL: Efficient On-Device Training for Federated Learning with Local Sparsity",
arXiv 2208.02507) runs SWAT (Raihan & Aamodt, NeurIPS 2020) on every client: each Conv/Linear
layer of the sparsified scope computes its forward with its top-k weights by magnitude and its
weight gradient with top-k activations, while dense master weights take the update. The client
uploads, per layer, the top ``1 - sparsity + mask_ratio`` of its weights (``upload``:
``topk_weights``, ``diff_topk_weights``, ``topk_diff`` or ``dense``); the server averages them
(``aggregation``: the paper's zero-as-value rule or ``per_coordinate``).

SWAT runs on the layers' own autograd: the layer computes with a fresh leaf holding the step's
sparse weights (its dense gradient moves to the weights in ``after_backward``) and a
saved-tensor hook hands its backward the sparse input. FLOPs are counted at the densities that
really ran. Algorithm, options and every choice where the paper is silent:
``docs/methods/zerofl.md``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.kernels.skeleton import compute_dtype
from sparsefl.kernels.topk import count_at_least, kth_largest, nonzero_fraction, shrink, topk_flat
from sparsefl.masks import default_scope
from sparsefl.methods.base import Functional, LocalHooks, Method
from sparsefl.models import ModelSpec
from sparsefl.patching import ForwardPatches
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS

Tensor = torch.Tensor
UploadPolicy = Literal["topk_weights", "diff_topk_weights", "topk_diff", "dense"]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroFLConfig(MethodConfig):
    """Options of ZeroFL (docs/methods)."""

    sparsity: float = opt(0.9, "SWAT weight sparsity: fraction of each sparsified layer's weights zeroed", ge=0, lt=1)
    act_sparsity: float | None = opt(
        None,
        "fraction of each sparsified layer's input activations dropped in the weight gradient "
        "(unset = method.sparsity, SWAT-U)",
        ge=0,
        lt=1,
    )
    upload: UploadPolicy = opt("topk_weights", "what a client uploads per sparsified layer")
    mask_ratio: float = opt(
        0.1, "r_mask: extra fraction uploaded per sparsified layer beyond 1 - sparsity (clipped to 1)", ge=0, le=1
    )
    aggregation: Literal["paper", "per_coordinate"] = opt(
        "paper", "paper: unsent = zero weight / zero delta (Alg. 1); per_coordinate: average over senders"
    )
    topk_period: int = opt(10, "recompute the exact top-k thresholds every this many local steps", ge=1)
    warmup_steps: int = opt(0, "recompute the exact top-k on every local step before this one", ge=0)
    sparsify_first: bool = opt(False, "also sparsify the input layer (the paper keeps it dense)")
    sparsify_classifier: bool = opt(False, "also sparsify the classifier (the paper's FEMNIST CNN keeps it dense)")

    def __post_init__(self) -> None:
        if self.sparsity <= 0:
            raise ConfigError("method.sparsity", self.sparsity, "a number > 0 and < 1 for zerofl")

    @property
    def weight_density(self) -> float:
        """Fraction of each sparsified layer's weights used in training: ``1 - sparsity``."""
        return 1.0 - self.sparsity

    @property
    def act_density(self) -> float:
        """Fraction of each sparsified layer's input activations kept for the weight gradient."""
        return 1.0 - (self.sparsity if self.act_sparsity is None else self.act_sparsity)

    @property
    def upload_density(self) -> float:
        """Fraction of each sparsified layer uploaded: ``min(1, 1 - sparsity + mask_ratio)``."""
        return min(1.0, 1.0 - self.sparsity + self.mask_ratio)


# --------------------------------------------------------------------------------------------------
# Top-k with deterministic ties, and SWAT's threshold cache
# --------------------------------------------------------------------------------------------------


def keep_count(numel: int, density: float) -> int:
    """``k = clip(round(density * numel), 1, numel)``: how many entries an exact top-k keeps."""
    return max(1, min(numel, int(round(density * numel)))) if numel else 0


def topk_mask(v: Tensor, density: float) -> tuple[Tensor, float]:
    """The exact top-k mask by magnitude, and its threshold.

    Exactly ``k = keep_count(v.numel(), density)`` entries are True: those with the largest |v|,
    ties broken in favour of the lower flat index (as a stable descending sort), so the result is
    deterministic. The threshold ``tau`` is the k-th largest |v|. Linear time
    (:func:`sparsefl.kernels.topk.topk_flat`).
    """
    a = v.detach().abs().flatten()
    k = keep_count(a.numel(), density)
    if k == 0:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device), 0.0
    mask, tau = topk_flat(a, k)
    return mask.view(v.shape), tau


class CachedTopK:
    """SWAT's top-k with threshold caching for one tensor stream (a layer's weights or inputs).

    :meth:`sparsify` takes the exact top-k (and stores its threshold) when :meth:`refresh_due`
    says so, and otherwise keeps ``|v| >= tau`` with the stored threshold (``|v| > 0`` when
    ``tau == 0``, since zeros add nothing).
    """

    def __init__(self, density: float, period: int, warmup_steps: int) -> None:
        self.density = density
        self.period = period
        self.warmup_steps = warmup_steps
        self.tau: float | None = None
        self.refreshed_at: int | None = None

    def refresh_due(self, step: int) -> bool:
        """Exact on the first use, during warm-up, and every ``period`` steps."""
        return self.tau is None or step < self.warmup_steps or step % self.period == 0

    def sparsify(self, v: Tensor, step: int) -> tuple[Tensor, float]:
        """``v`` (detached) with the entries outside its mask at local step ``step`` zeroed, and
        the mask's density: the exact ``k / n`` on a refresh, else the kept fraction (exact up
        to 8,192 entries, else measured on a fixed sample of that many:
        :func:`sparsefl.kernels.topk.nonzero_fraction`).

        The threshold steps take one pass (:func:`sparsefl.kernels.topk.shrink`); a refresh is
        linear time too (:func:`sparsefl.kernels.topk.kth_largest`), and it only builds an
        explicit mask when entries tied at the threshold must be dropped.
        """
        n = v.numel()
        if self.density >= 1.0 or n == 0:
            return v.detach(), 1.0
        if self.refresh_due(step):
            a = v.detach().abs().flatten()
            k = keep_count(n, self.density)
            tau = kth_largest(a, k)
            self.tau, self.refreshed_at = tau, step
            if tau > 0 and count_at_least(a, tau) > k:
                mask, _ = topk_flat(a, k)
                return v.detach() * mask.view(v.shape), k / n
            return shrink(v, tau), k / n  # tau == 0: every nonzero is kept, plus zeros
        assert self.tau is not None
        out = shrink(v, self.tau)
        return out, nonzero_fraction(out)

    def deferred(self, v: Tensor, step: int) -> tuple[Tensor | float, float]:
        """:meth:`sparsify` for a tensor that is only needed sparse later (a layer's input in
        the backward): the threshold to apply then (``shrink(v, tau)`` is exactly what
        :meth:`sparsify` returns) and the same density, without building the sparse tensor
        now; the sparse tensor itself when an exact top-k with ties needs an explicit mask."""
        n = v.numel()
        if self.density >= 1.0 or n == 0 or self.refresh_due(step):
            return self.sparsify(v, step)
        assert self.tau is not None
        return self.tau, nonzero_fraction(v.detach(), tau=self.tau)


# --------------------------------------------------------------------------------------------------
# SWAT through the layers' own autograd
# --------------------------------------------------------------------------------------------------


class _SparseInput:
    """Saved-tensor hooks that give a layer's backward its SWAT input: where the layer saves the
    tensor it computed with (``xc``: the input ``x``, cast for autocast or made contiguous), the
    backward unpacks ``x_sparse`` instead (or ``shrink(x, tau)`` for a threshold, built right
    then, so no sparse copy is held from the forward on threshold steps and the weight-gradient
    product reads a tensor still in cache), cast to ``xc``'s dtype: the old ``SwatConv``'s
    numbers, shrunk in the input's own dtype.

    The saved tensor is recognised by ``xc``'s data pointer and size (a linear layer saves a 2-D
    view of a 3-D input). As autograd skips its own in-place check for tensors saved through
    hooks, :meth:`unpack` makes it for every tensor saved here, and for ``x``.
    """

    def __init__(self, x: Tensor, xc: Tensor, x_sparse: Tensor | float) -> None:
        self.x = x
        self.x_sparse = x_sparse
        self.key = (xc.data_ptr(), xc.numel())
        self.marked = False

    def pack(self, t: Tensor) -> tuple[Tensor | tuple[torch.Size, torch.dtype], int]:
        if (t.data_ptr(), t.numel()) == self.key:
            self.marked = True
            return (t.shape, t.dtype), self.x._version
        return t, t._version

    def unpack(self, packed: tuple[Tensor | tuple[torch.Size, torch.dtype], int]) -> Tensor:
        saved, version = packed
        t = saved if isinstance(saved, Tensor) else self.x
        if t._version != version:
            raise RuntimeError(
                "zerofl: one of the variables needed for gradient computation has been modified by an "
                f"inplace operation (version {t._version}, saved at version {version})"
            )
        if isinstance(saved, Tensor):
            return saved
        shape, dtype = saved
        xs = self.x_sparse
        return (xs if isinstance(xs, Tensor) else shrink(self.x, xs)).to(dtype).reshape(shape)


def swat(layer: nn.Module, x: Tensor, w_sparse: Tensor, x_sparse: Tensor | float) -> Tensor:
    """SWAT's forward and backward through ``layer`` (a Conv1d/2d/3d or Linear), on its own
    autograd: the output ``layer(x)`` computed with the weights ``w_sparse``; in the backward,
    ``dL/dx`` through ``w_sparse`` and ``dL/dW = weight_grad(x_sparse, dL/dy)`` (dense over every
    weight position: a convolution's or linear layer's weight gradient does not read the weights),
    which arrives at ``w_sparse`` itself; the bias (dense) gets its usual gradient.

    ``x_sparse`` is ``x`` with the entries outside its top-k zeroed, or the threshold ``tau`` that
    gives it (``shrink(x, tau)``, built in the backward: :class:`_SparseInput`). To train the
    layer's dense weights, pass ``w_sparse`` as a leaf that requires grad and move its gradient to
    the weights (:class:`ZeroFLHooks` does). Under ``torch.autocast`` the input is cast here first
    (and a linear layer's non-contiguous input of three or more dimensions made contiguous), so
    that the tensor the layer saves is the one recognised; the sparse input is still shrunk in
    ``x``'s own dtype, then cast.

    Under autocast, a layer that runs twice in one forward sums its two weight gradients in the
    autocast dtype (autocast casts the leaf once per region): native autograd's behaviour for a
    reused layer, which the former autograd function summed in float32.
    """
    dt = compute_dtype(x)
    xc = x.to(dt)
    linear = isinstance(layer, nn.Linear)
    if linear and xc.dim() > 2 and not xc.is_contiguous():
        xc = xc.contiguous()  # the product saves a 2-D view of it (of a copy, otherwise)
    hooks = _SparseInput(x, xc, x_sparse)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        if linear:
            y = F.linear(xc, w_sparse, layer.bias)
        else:
            y = layer._conv_forward(xc, w_sparse, layer.bias)  # type: ignore[operator]
    if torch.is_grad_enabled() and w_sparse.requires_grad and not hooks.marked:
        raise RuntimeError(
            f"zerofl: {type(layer).__name__} did not save its input for the weight gradient in a form "
            "SWAT can sparsify (it saved a copy)"
        )
    return y


# --------------------------------------------------------------------------------------------------
# Scope
# --------------------------------------------------------------------------------------------------


def sparse_scope(model: nn.Module, cfg: ZeroFLConfig) -> list[str]:
    """State_dict names of the weights ZeroFL sparsifies: :func:`default_scope` minus the input
    layer (unless ``sparsify_first``) and the classifier (unless ``sparsify_classifier``)."""
    return default_scope(model, keep_first=not cfg.sparsify_first, keep_last=not cfg.sparsify_classifier)


def _module_of(model: nn.Module, weight_name: str) -> nn.Module:
    mod_name = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else ""
    return model.get_submodule(mod_name)


def topk_params(params: Mapping[str, Tensor], scope: Sequence[str], density: float) -> StateDict:
    """A copy of ``params`` with every tensor in ``scope`` masked to its exact top-k by |w|."""
    out = {k: v.clone() for k, v in params.items()}
    for name in scope:
        m, _ = topk_mask(out[name], density)
        out[name] = out[name] * m.to(out[name].dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Client hooks
# --------------------------------------------------------------------------------------------------


class ZeroFLHooks(LocalHooks):
    """SWAT around the local training loop: the sparsified layers' ``forward`` is replaced on the
    instance (restored by :meth:`close`) by :func:`swat` with cached top-k masks; the weight
    gradients reach the layers' weights in :meth:`after_backward`.

    Attributes
    ----------
    weight_topk, act_topk:
        Per sparsified weight name, the :class:`CachedTopK` of the weights and of the inputs.
    step:
        The local step whose forward runs next (0-based; advanced by :meth:`after_step`).
    """

    def __init__(self, model: nn.Module, profile: ModelProfile, scope: Sequence[str], cfg: ZeroFLConfig) -> None:
        super().__init__(model, profile)
        self.cfg = cfg
        self.scope = list(scope)
        self.step = 0
        self.weight_topk = {n: CachedTopK(cfg.weight_density, cfg.topk_period, cfg.warmup_steps) for n in self.scope}
        self.act_topk = {n: CachedTopK(cfg.act_density, cfg.topk_period, cfg.warmup_steps) for n in self.scope}
        self._w_sparse: dict[str, tuple[int, Tensor, float, Tensor]] = {}
        self._density: dict[str, LayerDensity] = {}
        self._patches = ForwardPatches()
        try:
            for name in self.scope:
                self._install(name, _module_of(model, name))
        except Exception:
            self.close()
            raise

    def _install(self, name: str, mod: nn.Module) -> None:
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise ValueError(
                    f"zerofl: layer {name!r} uses padding={mod.padding!r}, padding_mode={mod.padding_mode!r}; "
                    "only integer zero padding is supported in the sparsified scope"
                )
        elif not isinstance(mod, nn.Linear):
            raise ValueError(f"zerofl: {name!r} is not the weight of a Conv or Linear layer")
        hooks = self

        def forward(this: nn.Module, x: Tensor) -> Tensor:
            return hooks._swat_forward(name, this, x)

        self._patches.replace(mod, types.MethodType(forward, mod))

    def _weight_sparse(self, name: str, w: Tensor) -> tuple[Tensor, float]:
        """The layer's sparse weights for this step and their density. One mask per step, even if
        the layer runs several times in a forward pass; while ``w`` trains, a leaf whose gradient
        :meth:`after_backward` moves to ``w`` (:func:`swat`)."""
        cached = self._w_sparse.get(name)
        if cached is not None and cached[0] == self.step:
            return cached[1], cached[2]
        ws, d = self.weight_topk[name].sparsify(w, self.step)
        if w.requires_grad:
            ws = ws.detach().requires_grad_()
        self._w_sparse[name] = (self.step, ws, d, w)
        return ws, d

    def _swat_forward(self, name: str, mod: nn.Module, x: Tensor) -> Tensor:
        ws, wd = self._weight_sparse(name, mod.weight)
        xs, xd = self.act_topk[name].deferred(x, self.step)  # applied in the backward
        self._density[name] = LayerDensity(forward=wd, grad_input=wd, grad_weight=xd)
        return swat(mod, x, ws, xs)

    def after_backward(self, step: int) -> None:
        """Each sparsified layer's weight gradient, which arrived at this step's sparse-weight
        leaf, goes to the layer's weights (added to any gradient they have), for the optimiser.
        Until then it sits on the leaf: ``torch.autograd.grad`` asked for the weights gives None,
        and a loop that skips this call trains the sparsified weights not at all (the one local
        loop, :func:`sparsefl.runtime.client.train_step`, calls it). Moved here rather than by a hook
        on each leaf (``register_post_accumulate_grad_hook`` or ``register_hook``), which added
        about 50 us a layer here, 1.4% of a ResNet-20 step."""
        for at, ws, _, w in self._w_sparse.values():
            if at == self.step and ws.grad is not None:
                g, ws.grad = ws.grad, None
                w.grad = g if w.grad is None else w.grad + g

    def after_step(self, step: int) -> None:
        self.step = step + 1

    def densities(self) -> Mapping[str, LayerDensity]:
        """Per sparsified layer, the weight and activation densities of the last step's masks."""
        return dict(self._density)

    def functional(self) -> Functional | None:
        """SWAT as a stateful :class:`Functional`: per client, the cached weight and input
        thresholds are its step state and the kept counts its stats, so every step's densities
        (and FLOPs) are the sequential ones. The same numbers as :meth:`_swat_forward`, written
        with plain operations: the exact top-k by ``torch.kthvalue``, ties at the threshold
        dropped from the highest flat index; the layer's output ``y(x, W_s)`` plus
        ``z - z.detach()`` (exactly 0) for ``z = y(x_s, W)``, whose weight gradient is SWAT's
        ``dL/dW = weight_grad(x_s, dL/dy)``."""
        cfg, model = self.cfg, self.model
        mods = {n: _module_of(model, n) for n in self.scope}
        dens_w, dens_x = cfg.weight_density, cfg.act_density
        period, warmup = cfg.topk_period, cfg.warmup_steps
        sample = 8192  # nonzero_fraction's exact limit and sample size

        def topk(v: Tensor, tau: Tensor, density: float, refresh: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """CachedTopK.sparsify of one client's ``v``: (sparse v, threshold, kept, of)."""
            n = v.numel()
            full = torch.tensor(n, device=v.device)
            if density >= 1.0 or n == 0:
                return v, tau, full, full
            a = v.abs().reshape(-1)
            if refresh:
                k = keep_count(n, density)
                tau = torch.kthvalue(a, n - k + 1).values
                keep = a >= tau
                ties = a == tau
                from_end = ties.flip(0).cumsum(0).flip(0)
                drop = ties & (from_end <= keep.sum() - k) & (tau > 0)
                return v * (keep & ~drop).view(v.shape), tau, torch.tensor(k, device=v.device), full
            out = v * (a >= tau).view(v.shape)
            nz = (a >= tau) & (a != 0)
            if n > sample:  # nonzero_fraction's evenly spaced runs of 64 entries
                runs = max(1, sample // 64)
                idx = (torch.arange(runs, device=v.device)[:, None] * (n // runs)) + torch.arange(64, device=v.device)
                nz = nz.index_select(0, idx.reshape(-1))
            return out, tau, nz.sum(), torch.tensor(nz.numel(), device=v.device)

        def forward(
            p: Mapping[str, Tensor], b: Mapping[str, Tensor], x: Tensor, s: Mapping[str, Tensor], step: int
        ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
            refresh = step == 0 or step < warmup or step % period == 0
            new, stats = dict(s), {}
            patches = ForwardPatches()

            def swat_forward(name: str, mod: nn.Module, xin: Tensor) -> Tensor:
                w = mod.weight
                ws, new[f"tau_w/{name}"], stats[f"w/{name}"], stats[f"wn/{name}"] = topk(
                    w.detach(), s[f"tau_w/{name}"], dens_w, refresh
                )
                xs, new[f"tau_x/{name}"], stats[f"x/{name}"], stats[f"xn/{name}"] = topk(
                    xin.detach(), s[f"tau_x/{name}"], dens_x, refresh
                )
                if isinstance(mod, nn.Linear):
                    y, z = F.linear(xin, ws, mod.bias), F.linear(xs, w)
                else:
                    y, z = mod._conv_forward(xin, ws, mod.bias), mod._conv_forward(xs, w, None)  # type: ignore[operator]
                return y + (z - z.detach())

            for name, mod in mods.items():
                patches.replace(mod, types.MethodType(lambda this, xin, name=name: swat_forward(name, this, xin), mod))
            try:
                logits = functional_call(model, {**b, **p}, (x,))
            finally:
                patches.restore()
            return logits, new, stats

        def densities(stats: Mapping[str, int]) -> dict[str, LayerDensity]:
            out = {}
            for n in self.scope:
                wd = stats[f"w/{n}"] / stats[f"wn/{n}"]
                out[n] = LayerDensity(forward=wd, grad_input=wd, grad_weight=stats[f"x/{n}"] / stats[f"xn/{n}"])
            return out

        base = Functional.of_model(model, self.parameters())
        zero = torch.zeros((), dtype=torch.float32)
        state = {f"tau_{t}/{n}": zero.clone() for n in self.scope for t in ("w", "x")}
        key = ("zerofl", tuple(self.scope), dens_w, dens_x, period, warmup)
        return replace(base, forward=forward, state=state, step_densities=densities, key=key)

    def close(self) -> None:
        """Restore every replaced ``forward`` (instance attribute removed or put back)."""
        self._patches.restore()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register("zerofl", ZeroFLConfig, summary="ZeroFL (Qiu et al., ICLR 2022): SWAT on clients, top-k uploads")
class ZeroFL(Method):
    """ZeroFL (Qiu et al., ICLR 2022) on SWAT (Raihan & Aamodt, NeurIPS 2020); see the module
    docstring for the algorithm, the options and every departure from the paper."""

    config_cls = ZeroFLConfig
    config: ZeroFLConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        #: weight names SWAT sparsifies and whose uploads are top-k (state_dict names)
        self.scope: list[str] = sparse_scope(spec.template, config)

    # ---------------------------------------------------------------------------------- server
    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Alg. 1 of the paper (``aggregation=paper``) or per-coordinate averaging; see the module
        docstring. Unsent coordinates are zeroed first whatever the decoded values hold."""
        cfg = self.config
        names = list(state.params)
        ns = [r.num_examples for r in received]
        ups = [_clean(r.update) for r in received]
        diff = cfg.upload in ("diff_topk_weights", "topk_diff")
        sparse = [n for n in names if n in self.scope] if diff else []
        plain = [n for n in names if n not in sparse]
        per_coord = cfg.aggregation == "per_coordinate"
        new: StateDict = {}
        if plain:
            rule = agg.per_coordinate(ups, ns, state.params, plain) if per_coord else agg.zero_as_value(ups, ns, plain)
            new.update(rule)
        if sparse:
            if per_coord:
                zeros = {n: torch.zeros_like(state.params[n]) for n in sparse}
                mean = agg.per_coordinate(ups, ns, zeros, sparse)
                new.update({n: (state.params[n].double() + mean[n].double()).to(state.params[n].dtype) for n in sparse})
            else:
                new.update(agg.delta(ups, ns, state.params, sparse))
        return ServerState(round=state.round + 1, params={n: new[n] for n in names}, mask=state.mask, extra=state.extra)

    def eval_params(self, state: ServerState) -> StateDict:
        """The global model with each sparsified layer masked to its exact top-k (1 - sparsity)."""
        return topk_params(state.params, self.scope, self.config.weight_density)

    # ---------------------------------------------------------------------------------- client
    @property
    def why_not_batched(self) -> str | None:
        """Batched: :meth:`ZeroFLHooks.functional` describes SWAT's step."""
        return None

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> ZeroFLHooks:
        """SWAT on the sparsified layers for this local training."""
        return ZeroFLHooks(model, self.profile, self.scope, self.config)

    def personal_params(self, model: nn.Module, client_state: ClientState) -> StateDict:
        """The client's model with its sparsified layers masked to their top-k (as evaluated)."""
        return topk_params(model.state_dict(), self.scope, self.config.weight_density)

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Per ``method.upload``: top ``upload_density`` weights / deltas of each sparsified layer,
        every other tensor dense (plain values)."""
        cfg = self.config
        local = {k: v.detach().clone() for k, v in model.state_dict().items()}
        values: StateDict = dict(local)
        sent: dict[str, Tensor] = {}
        if cfg.upload == "dense":
            return Update(values=values), client_state
        dens = cfg.upload_density
        for name in self.scope:
            w = local[name]
            if cfg.upload == "topk_weights":
                v, m = w, topk_mask(w, dens)[0]
            elif cfg.upload == "diff_topk_weights":
                v, m = w - down.values[name].to(w.dtype), topk_mask(w, dens)[0]
            else:  # topk_diff
                v = w - down.values[name].to(w.dtype)
                m = topk_mask(v, dens)[0]
            values[name] = v * m.to(v.dtype)
            if not bool(m.all()):
                sent[name] = m
        return Update(values=values, sent=sent), client_state


def _clean(u: Update) -> Update:
    """The update with unsent coordinates set to zero (the decoder already does this; crafted
    updates may not)."""
    vals = {n: (torch.where(u.sent[n], v, torch.zeros_like(v)) if n in u.sent else v) for n, v in u.values.items()}
    return Update(values=vals, sent=dict(u.sent))
