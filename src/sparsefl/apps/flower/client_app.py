"""The sparsefl ClientApp: one ``train`` handler running the shared client runtime.

For each instruction it rebuilds the experiment from the run config (data, partition, model,
method and the clients' data source; cached per process, so a Ray actor builds it once and
keeps its clients' data shares across messages), takes the addressed client's state, runs
:func:`sparsefl.runtime.execute_task` (the same code as the embedded engine) and replies with
the encoded update. The
client's state lives in the node's ``context.state``, which Flower keeps per node across the
rounds of one Flower run, or, with ``sparsefl-client-states``, in files on the node
(:mod:`sparsefl.apps.flower.node_states`), which a resumed run (a new Flower run) finds
again; a node hosts as many clients as map to it (``client mod N``), each under its own key.

In a Deployment every message runs in a fresh ``flwr-clientapp`` process, so the cache does not
help there; building the tiny experiments of the tests takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from sparsefl.apps.flower.node_states import NodeStates, run_key
from sparsefl.apps.flower.options import AppOptions, experiment_sha
from sparsefl.engines.flower.records import (
    ERROR_PREFIX,
    load_state,
    result_content,
    save_state,
    task_from_content,
)
from sparsefl.experiment.runner import Built, build
from sparsefl.protocol.messages import ClientFailure
from sparsefl.runtime.client import ClientDataSource, execute_task
from sparsefl.runtime.device import prepare_device, resolve_device

app = ClientApp()


@dataclass(frozen=True)
class _Experiment:
    sha: str
    built: Built
    data: ClientDataSource


@lru_cache(maxsize=2)
def _experiment(config_json: str, overrides: str) -> _Experiment:
    cfg = AppOptions(config_json=config_json, overrides=overrides).experiment()
    b = build(cfg)
    device = resolve_device(cfg.device)  # this node's own GPU, where it has one (device=auto)
    prepare_device(device)
    data = ClientDataSource(b.data.x_train, b.data.y_train, b.split, device)
    return _Experiment(experiment_sha(cfg), b, data)


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=ERROR_PREFIX + reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one client task; reply with its update, or an ``Error`` saying why it failed."""
    opts = AppOptions.from_run_config(context.run_config)
    exp = _experiment(opts.config_json, opts.overrides)
    task, sha = task_from_content(msg.content)
    if sha != exp.sha:
        return _error(msg, f"config mismatch: task of experiment {sha}, this ClientApp resolved {exp.sha}")
    b = exp.built
    cfg = b.cfg
    files = NodeStates(opts.client_states, run_key(exp.sha, opts.out), context.run_id) if opts.client_states else None
    if files is None:
        state = load_state(context.state, task.client_id)
    else:
        state = files.load(task.client_id, task.round)
    out = execute_task(b.method, exp.data, task, state)
    if isinstance(out, ClientFailure):
        return _error(msg, out.reason)
    if files is None:
        save_state(context.state, task.client_id, out.state)
    else:
        files.save(task.client_id, task.round, out.state)
    return Message(result_content(out, cfg.comm.up), reply_to=msg)
