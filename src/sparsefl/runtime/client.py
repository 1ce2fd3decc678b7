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


def iter_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; a trailing batch of one sample is dropped when
    n > 1 (BatchNorm cannot train on a single sample)."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        b = perm[i : i + batch_size]
        if len(b) == 1 and n > 1:
            continue
        yield b


@dataclass(frozen=True)
class LocalStats:
    """What one round of local training did."""

    steps: int
    samples: int
    loss: float
    flops: FlopCount


def train_step(
    hooks: LocalHooks, opt: SGD, xb: torch.Tensor, yb: torch.Tensor, step: int, bf16: bool = False
) -> torch.Tensor:
    """One step of the local loop with the method's hooks around it; returns the loss.

    The body of :func:`train_local`, public so that benchmarks and tests time and check exactly
    what clients run.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits = hooks.forward(xb)
        loss = hooks.loss(logits, yb, xb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.after_backward(step)
    opt.step(hooks.update_rows(), hooks.row_grads())
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
    n = len(x)
    bs = min(local.batch_size, n)
    # bf16 convolutions run fastest in channels_last; the local model is a fresh copy, and its
    # state_dict is made contiguous on upload
    channels_last = local.precision == "bf16" and x.dim() == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    flops = FlopCount()
    total_loss, seen, step = 0.0, 0, 0
    max_steps = local.steps if local.steps > 0 else None
    epoch = 0
    while True:
        for idx in iter_batches(n, bs, gen):
            xb, yb = x[idx], y[idx]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = train_step(hooks, opt, xb, yb, step, local.precision == "bf16")
            flops = flops + train_flops(profile, len(idx), hooks.densities())
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        epoch += 1
        if (max_steps is not None and step >= max_steps) or (max_steps is None and epoch >= local.epochs):
            break
        if seen == 0:  # no usable batch (a single-sample client): nothing to train on
            break
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
    if task.fault == "crash":
        raise InjectedFault(f"client {task.client_id} crashed (injected, round {task.round})")
    x, y = data.x, data.y
    cfg = method.experiment
    model = method.new_model()
    spec = param_spec(model)
    setup = None
    if task.setup is not None:
        setup = decode_update(task.setup, method.setup_spec(spec))
        state = {k: v for k, v in state.items() if not k.startswith(KNOWN)}
        state.update({KNOWN + n: m for n, m in method.known_masks(setup).items()})
    known = {k[len(KNOWN) :]: v for k, v in state.items() if k.startswith(KNOWN)}
    down = decode_update(task.payload, spec, known=known)
    state = method.receive(model, down, state, setup)
    ctx = LocalContext(task.client_id, task.round, task.lr, cfg.seed, cfg.local, len(x), task.config)
    state = method.prepare(model, data, state, ctx)
    hooks = method.hooks(model, state, ctx)
    stats = LocalStats(steps=0, samples=0, loss=0.0, flops=FlopCount())
    if hooks is not None:
        try:
            gen = torch_gen(cfg.seed, "local", task.client_id, task.round)
            stats = train_local(hooks, x, y, cfg.local, task.lr, gen, method.profile)
        finally:
            hooks.close()
    update, state = method.upload(model, down, state, ctx)
    if task.fault == "nan":
        update = Update(values=poison(update.values), sent=update.sent)
    payload = encode_update(update, cfg.comm.up, known=known)
    if task.fault == "corrupt":
        payload = corrupt(payload, cfg.seed, task.round, task.client_id)
    metrics = {"steps": float(stats.steps)}
    if data.x_val is not None and data.y_val is not None and len(data.x_val):
        # the client's own model after local training (personalised where the method keeps
        # personal state) on its validation split
        acc, _ = evaluate(method.new_model(), method.personal_params(model, state), data.x_val, data.y_val)
        metrics["val_accuracy"] = acc
    return ClientResult(
        round=task.round,
        client_id=task.client_id,
        payload=payload,
        num_examples=len(x),
        loss=stats.loss,
        flops=float(stats.flops.total),
        flops_dense=float(stats.flops.total_dense),
        seconds=0.0,
        state=state,
        metrics=metrics,
    )


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
    out again when the whole training set is at most ``KEEP_CLIENT_DATA_BYTES``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, split: ClientSplit) -> None:
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
        idx = torch.from_numpy(self.split.train[cid])
        if not len(self.split.val[cid]):  # no validation split (the default)
            return ClientData(x.index_select(0, idx), y.index_select(0, idx))
        vidx = torch.from_numpy(self.split.val[cid])
        return ClientData(
            x.index_select(0, idx), y.index_select(0, idx), x.index_select(0, vidx), y.index_select(0, vidx)
        )
