"""The batched executor: a round's sampled clients train together in one vectorised computation.

Each client's round runs as in :func:`sparsefl.runtime.client.execute_task` up to its local
training (:func:`~sparsefl.runtime.client.begin_round`: decode, ``receive``, ``prepare``,
``hooks``) and after it (:func:`~sparsefl.runtime.client.finish_round`: ``upload``, faults,
encoding, metrics). In between, the clients whose hooks describe their step functionally
(:meth:`sparsefl.methods.base.LocalHooks.functional`) train together: their parameters, momentum,
gradient masks and BatchNorm buffers are stacked along a leading client dimension and one
``torch.func.vmap(grad_and_value(...))`` computes every client's step at once. On a GPU that is
many clients' small kernels as one large one; on a CPU it is usually slower.

The step is :class:`sparsefl.runtime.sgd.SGD`'s, operation for operation, so the results are the
sequential ones up to float reassociation inside the vectorised kernels. Each client draws its
batches from its own generator, ``(seed, "local", client, round)``, through
:func:`~sparsefl.runtime.client.batch_plan`: the same samples in the same order. A client with
fewer batches stops updating (its tensors are left out of later steps); where the clients'
current batches differ in size (trailing batches) the step runs once per batch size, since
padding would change BatchNorm's batch statistics. FLOPs, losses and steps are counted per
client exactly as :func:`~sparsefl.runtime.client.train_local` counts them. One departure: a
trained tensor the forward never uses gets a zero gradient here (the sequential optimiser skips
a tensor without a gradient), so weight decay and momentum still move it.

Clients whose hooks cannot be described functionally (or that train nothing) run the sequential
loop on their already prepared hooks. A round runs in waves of at most one chunk of clients,
each begun, trained and finished before the next (``max_clients``; on CUDA sized once per method
from one measured two-client step and the free memory).
"""

from __future__ import annotations

import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.func import grad_and_value, vmap

from sparsefl.accounting import FlopCount, ModelProfile, train_flops
from sparsefl.config import LocalConfig
from sparsefl.methods.base import Functional, Method
from sparsefl.protocol.messages import ClientData, ClientFailure, ClientResult, ClientState, ClientTask
from sparsefl.rng import torch_gen
from sparsefl.runtime.client import (
    ClientDataSource,
    ClientRound,
    LocalStats,
    batch_plan,
    begin_round,
    finish_round,
    torch_threads,
    train_local,
)

Tensor = torch.Tensor

#: Fraction of the free GPU memory an automatically sized chunk of clients may take.
CUDA_MEMORY_FRACTION = 0.7


#: The chunk size measured on CUDA for each method, reused in its later rounds.
_FIT: weakref.WeakKeyDictionary[Method, int] = weakref.WeakKeyDictionary()


def unsupported_reason(method: Method) -> str | None:
    """None when ``method``'s clients can train in the batched executor; else one line naming
    the method and why not."""
    local = method.experiment.local
    if local.precision != "fp32":
        return f"{method.config.name}: local.precision={local.precision}; the batched executor trains in fp32 only"
    return method.why_not_batched


@dataclass
class _Client:
    """One client inside the batched round."""

    index: int  # position in the round's task list
    task: ClientTask
    data: ClientData
    round: ClientRound
    seconds: float  # its own wall-clock time so far
    fn: Functional | None = None
    plan: list[Tensor] = field(default_factory=list)  # its index batches, in training order
    stats: LocalStats | None = None


def _signature(fn: Functional) -> Hashable:
    def spec(ts: Mapping[str, Tensor]) -> tuple:
        return tuple((k, tuple(t.shape), t.dtype) for k, t in ts.items())

    grad = tuple((k, isinstance(v, Tensor)) for k, v in fn.grad_scale.items())
    return (fn.key, spec(fn.params), spec(fn.buffers), grad)


def _failure(task: ClientTask, e: BaseException, note: str = "") -> ClientFailure:
    tb = traceback.format_exception_only(type(e), e)[-1].strip()
    return ClientFailure(task.client_id, f"raised {tb}{note}")


def run_batched(
    method: Method,
    data_source: ClientDataSource | Callable[[int], ClientData],
    tasks: Sequence[ClientTask],
    states: Sequence[ClientState],
    *,
    max_clients: int | None = None,
    device: torch.device | str | None = None,
) -> list[ClientResult | ClientFailure]:
    """Run a round's client ``tasks`` (with the clients' ``states``) together; the same results,
    in the same order, as ``[execute_task(method, data_source, t, s) for t, s in zip(tasks,
    states)]`` up to float reassociation.

    Parameters
    ----------
    method:
        The method; clients whose hooks give no :class:`~sparsefl.methods.base.Functional` run
        the sequential loop.
    data_source:
        Each client's data by client id.
    tasks, states:
        The round's tasks and each client's state, in the same order.
    max_clients:
        At most this many clients train in one vectorised computation (None: all of them on the
        CPU; on CUDA as many as fit :data:`CUDA_MEMORY_FRACTION` of the free memory).
    device:
        Where the stacked tensors train (None: where the clients' data is, as
        :func:`~sparsefl.runtime.client.execute_task` trains). Payloads are encoded on the CPU.
    """
    if len(tasks) != len(states):
        raise ValueError(f"run_batched: {len(tasks)} tasks and {len(states)} states")
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"run_batched: max_clients={max_clients} must be >= 1")
    cfg = method.experiment
    out: list[ClientResult | ClientFailure | None] = [None] * len(tasks)
    with torch_threads(cfg.local.threads):
        # the round runs in waves of at most one chunk of clients, each begun, trained and
        # finished before the next, so only one chunk's models and downlinks are alive at once
        size = max_clients if max_clients is not None else _FIT.get(method)
        measure = size is None and _on_cuda(data_source, device)
        start = 0
        while start < len(tasks):
            # on CUDA the first round's first wave is two clients, whose step sizes the rest
            stop = len(tasks) if size is None else start + size
            wave = range(start, min(len(tasks), start + 2 if measure else stop))
            clients = [c for i in wave if (c := _begin(i, tasks[i], states[i], method, data_source, out))]
            found = _train_wave(clients, method, _device(device, clients), out, size)
            if measure and clients:
                size = _FIT[method] = found
                measure = False
            for c in clients:
                _finish(c, method, out)
            start = wave.stop
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _on_cuda(data_source: object, device: torch.device | str | None) -> bool:
    """Whether the round trains on a CUDA device (where chunks are sized from a measured step)."""
    if device is not None:
        return torch.device(device).type == "cuda"
    x = getattr(data_source, "x", None)
    return isinstance(x, Tensor) and x.device.type == "cuda"


def _device(device: torch.device | str | None, clients: Sequence[_Client]) -> torch.device:
    """Where the stacked tensors train: ``device``, else where the clients' data is (as
    :func:`~sparsefl.runtime.client.execute_task` trains)."""
    if device is not None:
        return torch.device(device)
    return clients[0].data.x.device if clients else torch.device("cpu")


def _begin(
    i: int, task: ClientTask, state: ClientState, method: Method, data_source: Callable[[int], ClientData], out: list
) -> _Client | None:
    """The client's round up to its local training, and its batches; None (its failure in
    ``out``) when it raises."""
    cfg = method.experiment
    t0 = time.perf_counter()
    try:
        data = data_source(task.client_id)
        r = begin_round(task, method, data, state)
    except Exception as e:  # noqa: BLE001 - a failing client must not stop the federation
        out[i] = _failure(task, e)
        return None
    c = _Client(i, task, data, r, 0.0)
    if r.hooks is not None:
        try:
            c.fn = r.hooks.functional()
            if c.fn is not None:
                c.plan = batch_plan(len(data.x), cfg.local, torch_gen(cfg.seed, "local", task.client_id, task.round))
        except Exception as e:  # noqa: BLE001
            r.hooks.close()
            out[i] = _failure(task, e)
            return None
    c.seconds = time.perf_counter() - t0
    return c


def _train_wave(clients: list[_Client], method: Method, dev: torch.device, out: list, size: int | None) -> int:
    """Train a wave's clients: those with the same step signature together (in chunks of
    ``size``, or as many as fit), the rest one by one. Returns the chunk size it used."""
    groups: dict[Hashable, list[_Client]] = {}
    for c in clients:
        if c.fn is None:
            try:
                _train_alone(c, method)
            except Exception as e:  # noqa: BLE001 - a failing client must not stop the federation
                out[c.index] = _failure(c.task, e)
        else:
            groups.setdefault(_signature(c.fn), []).append(c)
    used = size or max(1, len(clients))
    for group in groups.values():
        fit = size if size is not None else _chunk_size(group, method, dev)
        used = min(used, fit)
        chunk_size = min(fit, len(group))
        for s in range(0, len(group), chunk_size):
            chunk = group[s : s + chunk_size]
            t0 = time.perf_counter()
            try:
                stats = _train_together(chunk, method, dev)
            except Exception as e:  # noqa: BLE001 - the chunk's clients fail, the round goes on
                for c in chunk:  # (their hooks are closed)
                    out[c.index] = _failure(c.task, e, " (batched training)")
                continue
            share = (time.perf_counter() - t0) / len(chunk)
            for c, st in zip(chunk, stats):
                c.stats = st
                c.seconds += share
    return used


def _finish(c: _Client, method: Method, out: list) -> None:
    """The client's round after its local training, into ``out``."""
    if out[c.index] is not None:
        return
    t0 = time.perf_counter()
    try:
        res = finish_round(c.round, method, c.data, c.stats or _no_stats())
    except Exception as e:  # noqa: BLE001 - a failing client must not stop the federation
        out[c.index] = _failure(c.task, e)
        return
    straggler = method.experiment.faults.straggler_seconds if c.task.fault == "straggler" else 0.0
    out[c.index] = replace(res, seconds=c.seconds + time.perf_counter() - t0 + straggler)


def _no_stats() -> LocalStats:
    return LocalStats(steps=0, samples=0, loss=0.0, flops=FlopCount())


def _train_alone(c: _Client, method: Method) -> None:
    """The sequential loop on the client's prepared hooks (a method step without a functional
    description), or nothing when its hooks are None."""
    hooks = c.round.hooks
    if hooks is None:
        c.stats = _no_stats()
        return
    t0 = time.perf_counter()
    cfg = method.experiment
    try:
        gen = torch_gen(cfg.seed, "local", c.task.client_id, c.task.round)
        c.stats = train_local(hooks, c.data.x, c.data.y, cfg.local, c.task.lr, gen, method.profile)
    finally:
        hooks.close()
    c.seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# One vectorised computation for a chunk of clients
# --------------------------------------------------------------------------------------------------


def _stack(ts: Sequence[Tensor], dev: torch.device) -> Tensor:
    return torch.stack([t.detach() for t in ts]).to(dev)


def _scale_of(fns: Sequence[Functional], name: str, like: Tensor, dev: torch.device) -> Tensor | float:
    """The stacked gradient factor of ``name`` (a float when every client has the same float)."""
    vals = [f.grad_scale[name] for f in fns]
    if all(not isinstance(v, Tensor) for v in vals) and len(set(vals)) == 1:
        return float(vals[0])  # type: ignore[arg-type]
    shape = like.shape[1:]
    return torch.stack([torch.as_tensor(v, dtype=like.dtype).expand(shape) for v in vals]).to(dev, like.dtype)


def _train_together(chunk: Sequence[_Client], method: Method, dev: torch.device) -> list[LocalStats]:
    """Train the chunk's clients (same step signature) as one vectorised computation; write the
    trained tensors back into each client's live tensors, close their hooks, and return each
    client's :class:`LocalStats`."""
    fns = [c.fn for c in chunk if c.fn is not None]
    hooks = [c.round.hooks for c in chunk if c.round.hooks is not None]
    assert len(fns) == len(hooks) == len(chunk)
    plans = [c.plan for c in chunk]
    try:
        for h in hooks:
            h.model.train()  # as train_local sets it
        ran = _vectorised_sgd(
            fns, [c.data for c in chunk], [c.task.lr for c in chunk], plans, method.experiment.local, dev
        )
    finally:
        for h in hooks:
            h.close()
    return [_stats(p, steps, f, method.profile) for p, steps, f in zip(plans, ran, fns, strict=True)]


def _stats(
    plan: Sequence[Tensor], steps: Sequence[tuple[float, Mapping[str, int]]], fn: Functional, profile: ModelProfile
) -> LocalStats:
    """A client's :class:`LocalStats` from its steps' losses and stats, accumulated step by step
    as ``train_local`` does."""
    flops = FlopCount()
    total, seen = 0.0, 0
    for idx, (loss, stats) in zip(plan, steps, strict=True):
        dens = fn.densities if fn.step_densities is None else fn.step_densities(stats)
        flops = flops + train_flops(profile, len(idx), dens)
        total += loss * len(idx)
        seen += len(idx)
    return LocalStats(steps=len(plan), samples=seen, loss=total / max(seen, 1), flops=flops)


def _vectorised_sgd(
    fns: Sequence[Functional],
    datas: Sequence[ClientData],
    lrs: Sequence[float],
    plans: Sequence[Sequence[Tensor]],
    local: LocalConfig,
    dev: torch.device,
) -> list[list[tuple[float, dict[str, int]]]]:
    """SGD on every client's stacked tensors, step by step; the trained values are written back
    into each client's live tensors. Returns each client's ``(loss, stats)`` of every step."""
    f0 = fns[0]
    names = list(f0.params)
    P = {k: _stack([f.params[k] for f in fns], dev) for k in names}
    B = {k: _stack([f.buffers[k] for f in fns], dev) for k in f0.buffers}
    S = {k: _stack([f.state[k] for f in fns], dev) for k in f0.state}
    scale = {k: _scale_of(fns, k, P[k], dev) for k in f0.grad_scale}
    mom: dict[str, Tensor] = {}
    # every client's samples in one tensor on the device: a step gathers its batches at once
    X = torch.cat([d.x for d in datas]).to(dev)
    Y = torch.cat([d.y for d in datas]).to(dev)
    offsets = [0]
    for d in datas[:-1]:
        offsets.append(offsets[-1] + len(d.x))
    C = len(fns)
    lr_same = len(set(lrs)) == 1
    lr_t = torch.tensor(lrs, dtype=torch.float64)
    stateful = bool(f0.state)

    def loss_fn(
        p: Mapping[str, Tensor], b: Mapping[str, Tensor], s: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int
    ) -> tuple[Tensor, tuple[Mapping[str, Tensor], Mapping[str, Tensor]]]:
        if stateful:
            logits, s, stats = f0.forward(p, b, x, s, step)
        else:
            logits, stats = f0.forward(p, b, x), {}
        return f0.loss(logits, y, x), (s, stats)

    step_fn = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0, 0, None))
    ran: list[tuple[list[int], Tensor, dict[str, Tensor]]] = []  # clients, losses, stats of each step
    longest = max((len(p) for p in plans), default=0)
    for t in range(longest):
        by_size: dict[int, list[int]] = {}
        for c in range(C):
            if len(plans[c]) > t:
                by_size.setdefault(len(plans[c][t]), []).append(c)
        for size, members in by_size.items():
            rows = torch.cat([plans[c][t] + offsets[c] for c in members]).to(dev, non_blocking=True)
            x = X.index_select(0, rows).view(len(members), size, *X.shape[1:])
            y = Y.index_select(0, rows).view(len(members), size, *Y.shape[1:])
            sel = None if len(members) == C else torch.tensor(members, device=dev)
            p = P if sel is None else {k: v.index_select(0, sel) for k, v in P.items()}
            b = B if sel is None else {k: v.index_select(0, sel) for k, v in B.items()}
            s = S if sel is None else {k: v.index_select(0, sel) for k, v in S.items()}
            grads, (loss, (s_new, stats)) = step_fn(p, b, s, x, y, t)
            ran.append((members, loss.detach(), dict(stats)))
            if sel is not None:
                for k, v in b.items():
                    B[k].index_copy_(0, sel, v)
                for k, v in s_new.items():
                    S[k].index_copy_(0, sel, v)
            else:
                S = dict(s_new)
            lr = lrs[members[0]] if lr_same else lr_t.index_select(0, torch.tensor(members)).to(dev)
            _sgd_update(P, grads, mom, scale, sel, t == 0, lr, local)
    with torch.no_grad():
        for c, fn in enumerate(fns):
            for k, live in fn.params.items():
                live.copy_(P[k][c].to(live.device))
            for k, live in fn.buffers.items():
                live.copy_(B[k][c].to(live.device))
    # one read-back of every loss and stat, in step order per client (as train_local adds them)
    stat_names = sorted({k for _, _, st in ran for k in st})
    cols = [torch.cat([loss.double() for _, loss, _ in ran])] if ran else []
    cols += [torch.cat([st[k].double() for _, _, st in ran]) for k in stat_names]
    table = torch.stack(cols, 1).cpu().tolist() if ran else []
    out: list[list[tuple[float, dict[str, int]]]] = [[] for _ in range(C)]
    at = 0
    for members, _, _ in ran:
        for c in members:
            row = table[at]
            out[c].append((row[0], {k: int(v) for k, v in zip(stat_names, row[1:])}))
            at += 1
    return out


def _sgd_update(
    P: dict[str, Tensor],
    grads: Mapping[str, Tensor],
    mom: dict[str, Tensor],
    scale: Mapping[str, Tensor | float],
    sel: Tensor | None,
    first: bool,
    lr: float | Tensor,
    local: LocalConfig,
) -> None:
    """:class:`sparsefl.runtime.sgd.SGD`'s step on the stacked tensors of the clients ``sel``
    (None: every client): the gradient factor (``after_backward``), ``local.clip_norm``'s
    clipping per client, weight decay, momentum (``buf = g`` on the first step, every client's
    first step being step 0), the update."""
    wd, m = local.weight_decay, local.momentum
    scaled = {}
    for k, g in grads.items():
        s = scale.get(k)
        if s is not None:
            g = g * (s if not isinstance(s, Tensor) or sel is None else s.index_select(0, sel))
        scaled[k] = g
    if local.clip_norm > 0 and scaled:
        # torch.nn.utils.clip_grad_norm_ per client: the norm of the per-tensor norms
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in scaled.values()])
        total = torch.linalg.vector_norm(norms, 2, dim=0)
        coef = torch.clamp(local.clip_norm / (total + 1e-6), max=1.0)
        scaled = {k: g * coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for k, g in scaled.items()}
    for k, g in scaled.items():
        p = P[k] if sel is None else P[k].index_select(0, sel)
        if wd != 0:
            g = g.add(p, alpha=wd)
        if m != 0:
            if first:
                if k not in mom:
                    mom[k] = torch.zeros_like(P[k])
                buf = g.clone()
            else:
                buf = mom[k] if sel is None else mom[k].index_select(0, sel)
                buf.mul_(m).add_(g)
            if sel is None:
                mom[k] = buf
            else:
                mom[k].index_copy_(0, sel, buf)
            g = buf
        if isinstance(lr, Tensor):
            p = p - g * lr.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
        else:
            p = p.add(g, alpha=-lr)
        if sel is None:
            P[k] = p
        else:
            P[k].index_copy_(0, sel, p)


# --------------------------------------------------------------------------------------------------
# Chunk size on CUDA
# --------------------------------------------------------------------------------------------------


def _chunk_size(group: Sequence[_Client], method: Method, dev: torch.device) -> int:
    """:func:`_auto_chunk`, or one client at a time where even its measurement fails."""
    try:
        return _auto_chunk(group, method, dev)
    except Exception:  # noqa: BLE001 - e.g. out of memory for two clients
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return 1


def _auto_chunk(group: Sequence[_Client], method: Method, dev: torch.device) -> int:
    """Every client at once on the CPU; on CUDA as many clients as fit
    :data:`CUDA_MEMORY_FRACTION` of the free memory, from one measured step of two clients
    (measured once per method: it resets CUDA's peak-memory statistics)."""
    if dev.type != "cuda":
        return max(1, len(group))
    f0 = group[0].fn
    assert f0 is not None
    local = method.experiment.local
    data = group[0].data
    bs = min(local.batch_size, len(data.x))
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    # a dry step on copies: the clients' own tensors are left as they are
    copies = [
        replace(
            f0,
            params={k: v.detach().clone() for k, v in f0.params.items()},
            buffers={k: v.detach().clone() for k, v in f0.buffers.items()},
        )
        for _ in range(2)
    ]
    plan = [torch.arange(bs)]
    _vectorised_sgd(copies, [data, data], [1e-3, 1e-3], [plan, plan], local, dev)
    torch.cuda.synchronize(dev)
    per_client = max(1, (torch.cuda.max_memory_allocated(dev) - base) // 2)
    data_bytes = max(c.data.x.numel() * c.data.x.element_size() for c in group)
    free, _ = torch.cuda.mem_get_info(dev)
    return max(1, int(CUDA_MEMORY_FRACTION * free // (per_client + data_bytes)))


__all__ = ["CUDA_MEMORY_FRACTION", "run_batched", "unsupported_reason"]
