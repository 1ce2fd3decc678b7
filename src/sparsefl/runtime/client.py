"""The client runtime: one client's round, the one local training loop, and the client's data.

The same code runs a client in this process, in a worker process and on a Flower node: an
engine only carries :class:`~sparsefl.protocol.ClientTask` values to :func:`execute_task`.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from sparsefl.accounting import FlopCount, ModelProfile, train_flops
from sparsefl.comm import Update, decode_update, encode_update
from sparsefl.config import LocalConfig
from sparsefl.data import ClientSplit
from sparsefl.methods.base import LocalHooks, Method
from sparsefl.protocol.faults import InjectedFault, corrupt, poison
from sparsefl.protocol.messages import (
    KNOWN,
    ClientData,
    ClientFailure,
    ClientResult,
    ClientState,
    ClientTask,
    LocalContext,
)
from sparsefl.rng import torch_gen
from sparsefl.runtime.evaluate import evaluate
from sparsefl.runtime.sgd import SGD

#: A training set of up to this many bytes has each client's share kept after its first task
#: (one more copy of the set at most); a larger one is gathered again for every task.
KEEP_CLIENT_DATA_BYTES = 64 * 2**20

_T = TypeVar("_T")


def iter_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; a trailing batch of one sample is dropped when
    n > 1 (BatchNorm cannot train on a single sample)."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        b = perm[i : i + batch_size]
        if len(b) == 1 and n > 1:
            continue
        yield b


def batch_plan(n: int, local: LocalConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Every index batch a client of ``n`` samples trains on, in order: ``local.epochs`` epochs
    (or exactly ``local.steps`` steps, across epochs) of :func:`iter_batches` from ``gen``;
    none for a client without a usable batch (a single sample)."""
    bs = min(local.batch_size, n)
    max_steps = local.steps if local.steps > 0 else None
    plan: list[torch.Tensor] = []
    epoch = 0
    while True:
        for idx in iter_batches(n, bs, gen):
            plan.append(idx)
            if max_steps is not None and len(plan) >= max_steps:
                return plan
        epoch += 1
        if not plan or (max_steps is None and epoch >= local.epochs):
            return plan


@dataclass(frozen=True)
class LocalStats:
    """What one round of local training did."""

    steps: int
    samples: int
    loss: float
    flops: FlopCount


def train_step(
    hooks: LocalHooks,
    opt: SGD,
    xb: torch.Tensor,
    yb: torch.Tensor,
    step: int,
    bf16: bool = False,
    clip_norm: float = 0.0,
) -> torch.Tensor:
    """One step of the local loop with the method's hooks around it; returns the loss.

    The body of :func:`train_local`, public so that benchmarks and tests time and check exactly
    what clients run. ``clip_norm > 0`` clips the total gradient norm of ``hooks.parameters()``
    and of the hooks' row-compact gradients (``local.clip_norm``), as ``clip_grad_norm_`` does.
    """
    with torch.autocast(xb.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits = hooks.forward(xb)
        loss = hooks.loss(logits, yb, xb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.after_backward(step)
    rows = hooks.row_grads()
    if clip_norm > 0:
        # after the method's gradient hooks, so the norm is that of the masked gradients it
        # applies, over every optimised parameter (e.g. KD's projections with the student) and
        # the row-compact gradients that stand in for some of them
        grads = [p.grad for p in hooks.parameters() if p.grad is not None] + list(rows.values())
        coef = torch.clamp(clip_norm / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    opt.step(hooks.update_rows(), rows)
    hooks.after_step(step)
    return loss


def train_local(
    hooks: LocalHooks,
    x: torch.Tensor,
    y: torch.Tensor,
    local: LocalConfig,
    lr: float,
    gen: torch.Generator,
    profile: ModelProfile,
) -> LocalStats:
    """The one local training loop: SGD with momentum and weight decay for ``local.epochs``
    epochs (or exactly ``local.steps`` steps), with the method's hooks around every step.

    FLOPs are accumulated per step from the model profile and the densities the hooks report
    for that step, so every method is counted by the same convention.
    """
    model = hooks.model
    model.train()
    params = hooks.parameters()
    opt = SGD(params, lr=lr, momentum=local.momentum, weight_decay=local.weight_decay)
    # bf16 convolutions run fastest in channels_last; the local model is a fresh copy, and its
    # state_dict is made contiguous on upload
    channels_last = local.precision == "bf16" and x.dim() == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    flops = FlopCount()
    total_loss, seen, step = 0.0, 0, 0
    # on an accelerator the batch indices go there, and the loss is summed there (reading it
    # back every step would wait for the device each time)
    on_device = x.device.type != "cpu"
    device_loss = torch.zeros((), dtype=torch.float64, device=x.device) if on_device else None
    for idx in batch_plan(len(x), local, gen):
        rows = idx.to(x.device, non_blocking=True) if on_device else idx
        xb, yb = x[rows], y[rows]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = train_step(hooks, opt, xb, yb, step, local.precision == "bf16", local.clip_norm)
        flops = flops + train_flops(profile, len(idx), hooks.densities())
        if device_loss is not None:
            device_loss += loss.detach().double() * len(idx)
        else:
            total_loss += float(loss.detach()) * len(idx)
        seen += len(idx)
        step += 1
    if device_loss is not None:
        total_loss = float(device_loss)
    return LocalStats(steps=step, samples=seen, loss=total_loss / max(seen, 1), flops=flops)


def param_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every state_dict entry: what a decoder must accept."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def torch_threads(n: int):  # type: ignore[no-untyped-def]
    """Run a block with ``n`` intra-op threads, restoring the previous setting afterwards (no
    change, and no cost, when it is already ``n``)."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_client(task: ClientTask, method: Method, data: ClientData, state: ClientState) -> ClientResult:
    """One client's round: decode the downlink, train, encode the upload.

    Randomness comes from a generator derived from ``(seed, "local", client, round)`` and the
    thread count is fixed by ``local.threads``, so the result is the same wherever and in
    whatever order clients run. ``seconds`` is the client's wall-clock time, from decoding
    its downlink to releasing what it built (its models, optimiser and decoded tensors).
    """
    with torch_threads(method.experiment.local.threads):
        t0 = time.perf_counter()
        result = _client_round(task, method, data, state)  # its objects go when it returns
        straggler = method.experiment.faults.straggler_seconds if task.fault == "straggler" else 0.0
        return replace(result, seconds=time.perf_counter() - t0 + straggler)


def _client_round(task: ClientTask, method: Method, data: ClientData, state: ClientState) -> ClientResult:
    """:func:`run_client` without its clock (``seconds`` is set by the caller)."""
    r = begin_round(task, method, data, state)
    stats = LocalStats(steps=0, samples=0, loss=0.0, flops=FlopCount())
    if r.hooks is not None:
        try:
            gen = torch_gen(method.experiment.seed, "local", task.client_id, task.round)
            stats = train_local(r.hooks, data.x, data.y, method.experiment.local, task.lr, gen, method.profile)
        finally:
            r.hooks.close()
    return finish_round(r, method, data, stats)


@dataclass
class ClientRound:
    """One client's round between :func:`begin_round` and :func:`finish_round`: what local
    training works on (``hooks`` around ``model``; None trains nothing) and what the upload needs."""

    task: ClientTask
    model: torch.nn.Module
    down: Update
    state: ClientState
    ctx: LocalContext
    known: dict[str, torch.Tensor]
    hooks: LocalHooks | None


def begin_round(task: ClientTask, method: Method, data: ClientData, state: ClientState) -> ClientRound:
    """A client's round up to local training: the injected crash, decoding the downlink (and the
    setup payload), ``receive``, ``prepare`` and ``hooks`` (the sequential loop and the batched
    executor share it)."""
    if task.fault == "crash":
        raise InjectedFault(f"client {task.client_id} crashed (injected, round {task.round})")
    cfg = method.experiment
    device = data.x.device
    model = method.new_model()
    if device.type != "cpu":  # the client computes where its data is
        model.to(device)
    spec = param_spec(model)
    setup = None
    if task.setup is not None:
        setup = decode_update(task.setup, method.setup_spec(spec))
        state = {k: v for k, v in state.items() if not k.startswith(KNOWN)}
        state.update({KNOWN + n: m for n, m in method.known_masks(setup).items()})
    known = {k[len(KNOWN) :]: v for k, v in state.items() if k.startswith(KNOWN)}
    down = decode_update(task.payload, spec, known=known)
    if device.type != "cpu":  # decoded on the CPU (the codecs' home), then moved once
        down, setup, state = on_device((down, setup, state), device)
    state = method.receive(model, down, state, setup)
    ctx = LocalContext(task.client_id, task.round, task.lr, cfg.seed, cfg.local, len(data.x), task.config)
    state = method.prepare(model, data, state, ctx)
    hooks = method.hooks(model, state, ctx)
    return ClientRound(task, model, down, state, ctx, known, hooks)


def finish_round(r: ClientRound, method: Method, data: ClientData, stats: LocalStats) -> ClientResult:
    """A client's round after local training (its hooks closed): ``upload``, the injected update
    and payload faults, the encoding and the metrics (``seconds`` is set by the caller)."""
    cfg = method.experiment
    task = r.task
    update, state = method.upload(r.model, r.down, r.state, r.ctx)
    kept = state  # where the model is, for the validation below
    if data.x.device.type != "cpu":  # encoded and kept on the CPU: the same bytes as a CPU client's
        update, state = on_device((update, state), torch.device("cpu"))
    if task.fault == "nan":
        update = Update(values=poison(update.values), sent=update.sent)
    payload = encode_update(update, cfg.comm.up, known=r.known)
    if task.fault == "corrupt":
        payload = corrupt(payload, cfg.seed, task.round, task.client_id)
    metrics = {"steps": float(stats.steps)}
    if data.x_val is not None and data.y_val is not None and len(data.x_val):
        # the client's own model after local training (personalised where the method keeps
        # personal state) on its validation split
        model = method.new_model().to(data.x_val.device)
        acc, _ = evaluate(model, method.personal_params(r.model, kept), data.x_val, data.y_val)
        metrics["val_accuracy"] = acc
    return ClientResult(
        round=task.round,
        client_id=task.client_id,
        payload=payload,
        num_examples=len(data.x),
        loss=stats.loss,
        flops=float(stats.flops.total),
        flops_dense=float(stats.flops.total_dense),
        seconds=0.0,
        state=state,
        metrics=metrics,
    )


def on_device(obj: _T, device: torch.device) -> _T:
    """``obj`` with every tensor in it (through dicts, lists, tuples and :class:`Update`) moved
    to ``device``; a tensor already there is the same tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)  # type: ignore[return-value]
    if isinstance(obj, Update):
        return Update(values=on_device(obj.values, device), sent=on_device(obj.sent, device))  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {k: on_device(v, device) for k, v in obj.items()}  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_device(v, device) for v in obj)  # type: ignore[return-value]
    return obj


def execute_task(
    method: Method, data: ClientDataSource, task: ClientTask, state: ClientState
) -> ClientResult | ClientFailure:
    """Run one client task on its share of the training data; any exception becomes a
    :class:`ClientFailure` with the error's last line (every engine's client side)."""
    try:
        return run_client(task, method, data(task.client_id), state)
    except Exception as e:  # noqa: BLE001 - a failing client must not stop the federation
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return ClientFailure(task.client_id, f"raised {tb}")


class ClientDataSource:
    """Each client's share of the training data (and of its validation split), by client id.

    Clients only read their data (batches are gathered from it), so a share is kept and handed
    out again when the whole training set is at most ``KEEP_CLIENT_DATA_BYTES``. With a
    ``device`` other than the CPU the training set moves there once, here, and every share is
    gathered there: the clients then train on that device.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, split: ClientSplit, device: torch.device | None = None
    ) -> None:
        if device is not None and device.type != "cpu":
            x, y = x.to(device), y.to(device)
        self.x, self.y, self.split = x, y, split
        self.keep = x.numel() * x.element_size() + y.numel() * y.element_size() <= KEEP_CLIENT_DATA_BYTES
        self._kept: dict[int, ClientData] = {}
        self.gathers = 0  # shares gathered from the training set (a kept share is gathered once)

    def __call__(self, cid: int) -> ClientData:
        data = self._kept.get(cid)
        if data is None:
            data = self._gather(cid)
            if self.keep:
                self._kept[cid] = data
        return data

    def _gather(self, cid: int) -> ClientData:
        self.gathers += 1
        x, y = self.x, self.y
        # index_select: the same tensors as x[idx], faster
        idx = torch.from_numpy(self.split.train[cid]).to(x.device)
        if not len(self.split.val[cid]):  # no validation split (the default)
            return ClientData(x.index_select(0, idx), y.index_select(0, idx))
        vidx = torch.from_numpy(self.split.val[cid]).to(x.device)
        return ClientData(
            x.index_select(0, idx), y.index_select(0, idx), x.index_select(0, vidx), y.index_select(0, vidx)
        )
