"""The sparsefl ServerApp: our server round loop, with Flower nodes running the clients.

``main`` reads the experiment from the run config (:mod:`sparsefl.apps.flower.options`),
waits for the expected SuperNodes, fixes the client -> node map, and calls
:func:`sparsefl.experiment.runner.run_experiment` with a
:class:`~sparsefl.engines.flower.engine.FlowerEngine`. The run folder (``sparsefl-out``) is
therefore written by the same code as for the embedded engine, so its metrics, summary and
``model_sha256`` are the same for the same config; resuming works the same way (but see
``docs/flower.md``: per-client state lives on the nodes for one Flower run only).

It does not use a Flower ``Strategy``: sampling, faults, decoding and aggregation are the
server loop's (:class:`sparsefl.runtime.server.Server`), so every engine gives the same result.
"""

from __future__ import annotations

import json
import time
from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from sparsefl.apps.flower.options import ERROR_MARK, RESULT_MARK, AppOptions, experiment_sha
from sparsefl.engines.flower.engine import FlowerEngine
from sparsefl.errors import SparseflError

app = ServerApp()


def wait_for_nodes(grid: Grid, want: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Sorted ids of the connected nodes once at least ``want`` are there.

    Raises
    ------
    SparseflError
        Fewer than ``want`` nodes connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(int(n) for n in grid.get_node_ids())
        if len(ids) >= want:
            return ids
        if time.monotonic() >= deadline:
            raise SparseflError(
                f"only {len(ids)} of the {want} expected SuperNodes connected within {timeout:g} s "
                "(run-config key sparsefl-nodes / sparsefl-node-wait)"
            )
        time.sleep(poll)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment of ``context.run_config`` with this run's nodes as clients."""
    try:
        _main(grid, context)
    except SparseflError as e:  # one parseable line, then let Flower record the failure
        log(ERROR, "%s%s", ERROR_MARK, json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise


def _main(grid: Grid, context: Context) -> None:
    from sparsefl.experiment.runner import run_experiment

    opts = AppOptions.from_run_config(context.run_config)
    cfg = opts.experiment()
    nodes = wait_for_nodes(grid, opts.nodes, opts.node_wait)
    wait = opts.reply_wait(cfg)
    log(INFO, "sparsefl: %d nodes, reply wait %g s, run folder %s", len(nodes), wait, opts.out)
    engine = FlowerEngine(
        grid,
        nodes,
        experiment=experiment_sha(cfg),
        codec_down=cfg.comm.down,
        codec_up=cfg.comm.up,
        reply_timeout=wait,
        poll=opts.poll,
        trace=opts.trace or None,
    )

    def progress(record, meta):  # type: ignore[no-untyped-def]
        acc = "-" if record.accuracy is None else f"{record.accuracy:.4f}"
        log(INFO, "sparsefl: round %d acc %s failures %d", record.round, acc, len(record.failures))

    summary = run_experiment(
        cfg, opts.out, engine=engine, progress=progress, log=lambda m: log(INFO, "sparsefl: %s", m)
    )
    log(INFO, "%s%s", RESULT_MARK, json.dumps({k: summary.get(k) for k in ("status", "rounds", "model_sha256")}))
