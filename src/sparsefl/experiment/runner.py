"""Build an experiment from its config and run it into a run folder.

``build`` wires data -> partition -> model -> method -> engine; ``run_experiment`` drives the
server loop, writing metrics and an atomic checkpoint after every round, and the summary,
final model, mask and plots at the end. Re-running on an existing folder resumes from the last
good checkpoint, or reports a finished run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsefl.methods  # noqa: F401  (fills the method registry)
from sparsefl.accounting import profile_model
from sparsefl.config import ExperimentConfig, config_hash
from sparsefl.data import ClientSplit, Dataset, load_dataset, make_partition
from sparsefl.engines.embedded import EmbeddedEngine, start_fork_server
from sparsefl.errors import ConfigError
from sparsefl.experiment.runfolder import RunFolder, checkpoint_bytes
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Method
from sparsefl.models import ModelSpec, build_model
from sparsefl.protocol.messages import ServerState
from sparsefl.registry import METHODS
from sparsefl.runtime.client import torch_threads
from sparsefl.runtime.server import Engine, RoundRecord, Server, state_of
from sparsefl.runtime.store import ClientStateStore
from sparsefl.state import atomic_write_bytes, clone_state, state_sha256


@dataclass
class Built:
    """The assembled pieces of one experiment."""

    cfg: ExperimentConfig
    data: Dataset
    split: ClientSplit
    spec: ModelSpec
    method: Method


def build(cfg: ExperimentConfig, model: nn.Module | None = None, data: Dataset | None = None) -> Built:
    """Load data, partition it, build the model and the method (nothing runs yet)."""
    data = data if data is not None else load_dataset(cfg.data, cfg.seed)
    split = make_partition(data.y_train.numpy(), cfg.federation.num_clients, cfg.data, cfg.seed)
    if model is None:
        model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    spec = ModelSpec(model, data.input_shape, data.num_classes)
    profile = profile_model(spec.build(), data.input_shape)
    method_cls = METHODS.get(cfg.method.name)
    method = method_cls(cfg.method, cfg, spec, profile)
    return Built(cfg, data, split, spec, method)


def _prunable_density(model: nn.Module, params: dict[str, torch.Tensor]) -> float:
    names = default_scope(model)
    total = sum(params[n].numel() for n in names)
    kept = sum(int((params[n] != 0).sum()) for n in names)
    return kept / total if total else 1.0


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


ProgressFn = Callable[[RoundRecord, dict[str, Any]], None]


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` into the folder ``out`` and return the summary.

    An existing folder with the same config resumes from its last good checkpoint (or returns
    the finished run's summary, unless ``force``); a different config there is refused.

    Each round is evaluated and recorded (metrics line, checkpoint, then ``progress``) in a
    server thread while the next round trains, in round order; ``progress`` is called there.
    """
    if cfg.engine != "embedded" and engine is None:
        raise ConfigError("engine", cfg.engine, "'embedded' here (Flower engines run through sparsefl.run or the CLI)")
    folder = RunFolder(out)
    if force:
        folder.reset()
    status = folder.claim(cfg)
    if status == "finished":
        summary = folder.read_summary()
        assert summary is not None
        return {**summary, "status": "finished"}

    t_start = time.perf_counter()
    if engine is None and cfg.jobs > 1:
        start_fork_server(cfg.local.threads)  # it imports torch while the data and the model are built
    b = build(cfg, model)
    method = b.method
    store = ClientStateStore(folder.path / "clients" if cfg.federation.client_state == "disk" else None)
    if engine is None:
        engine = EmbeddedEngine(method, b.data.x_train, b.data.y_train, b.split, cfg.jobs, store)
    # one server thread: it evaluates and records each round while the next one trains. The
    # evaluation is mostly long kernels, which release the GIL, so it takes a free core (when
    # there is one: its intra-op threads come on top of the training's). Uploads are decoded in
    # the training thread: decoding here would contend with training for the GIL.
    background = ThreadPoolExecutor(
        1, thread_name_prefix="sparsefl-server", initializer=torch.set_num_threads, initargs=(cfg.local.threads,)
    )
    overlap = 2 * cfg.local.threads <= _usable_cpus()
    try:  # the engine's worker processes are shut down whatever happens next
        server = Server(cfg, method, engine, b.data.x_test, b.data.y_test, store=store)

        if status == "resume" and log is not None:
            for name in folder.damaged_checkpoints():
                log(f"{folder.path / name} is damaged (hash mismatch or truncated); using the previous good checkpoint")
        ckpt: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        # the newest good checkpoint whose rounds metrics.jsonl holds (each line is fsync'ed
        # before the checkpoint that counts it, so only a damaged file lacks them; the previous
        # checkpoint may still be covered); checkpoints of earlier versions carry the records
        for ck in folder.good_checkpoints() if status == "resume" else ():
            try:
                recs = list(ck["metrics"]) if "metrics" in ck else folder.read_metrics(ck["metrics_count"])
            except ValueError:  # a damaged line (JSONDecodeError)
                recs = []
            if len(recs) == ck["server"]["round"]:
                ckpt, records = ck, recs
                break
            if log is not None:
                log(f"{folder.path / 'metrics.jsonl'} lacks rounds of the checkpoint of round {ck['server']['round']}")
        if status == "resume" and log is not None:
            if ckpt is not None:
                log(f"resuming {folder.path} after round {ckpt['server']['round']}")
            else:
                log(f"{folder.path}: no usable checkpoint; starting again from round 1")
        if ckpt is not None:
            state = server.restore(ckpt)
            wall_before = float(ckpt["wall_seconds"])
        else:
            params = clone_state(b.spec.build().state_dict())
            proxy = (b.data.x_train[:256], b.data.y_train[:256])
            state = server.restore(None, method.init_state(params, proxy))
            records = []
            wall_before = 0.0
        folder.write_metrics(records)

        def finish(record: RoundRecord, snapshot: dict[str, Any], keep: dict[int, int]) -> None:
            """The end of a round, in the server thread while the next round trains: evaluate
            (the checkpoint's copy of the state), then the metrics line, the checkpoint (durable
            in that order), the client files no checkpoint needs any more, and progress. The
            loop waits for each round end before queuing the next, so a failed one stops the
            run and nothing after it is recorded."""
            server.evaluate_round(state_of(snapshot), record)
            records.append(record.to_json())
            folder.append_metrics(records[-1])
            folder.write_checkpoint(checkpoint_bytes(snapshot))
            store.commit(record.round, keep)
            if progress is not None:
                progress(record, {"rounds": cfg.federation.rounds})

        pending: Future[None] | None = None
        cfg_hash = config_hash(cfg)  # once, not per round
        # the client files of checkpoint.prev.pt (the fallback) stay until the next commit
        prev_versions = store.versions()
        try:
            for rnd in range(state.round + 1, cfg.federation.rounds + 1):
                state, record = server.train_round(state, rnd)
                with torch_threads(cfg.local.threads):
                    # the checkpoint's content is copied now (later rounds may change tensors in
                    # place); the server thread serialises and writes it
                    snapshot = {
                        "config_hash": cfg_hash,
                        **server.checkpoint(state),
                        "metrics_count": rnd,
                        "wall_seconds": wall_before + time.perf_counter() - t_start,
                    }
                if pending is not None:  # at most one round end outstanding (a failed one stops here)
                    pending.result()
                pending = background.submit(finish, record, snapshot, prev_versions)
                prev_versions = store.versions()
                if not overlap:
                    pending.result()
            if pending is not None:
                pending.result()
        except BaseException as e:
            # the round already trained is recorded first (exception() waits for it)
            late = pending.exception() if pending is not None else None
            if late is not None and late is not e and log is not None:  # not lost behind `e`
                log(f"recording the last trained round failed too: {late!r}")
            raise
        finally:
            background.shutdown(wait=True)
    finally:
        engine.close()

    final = method.eval_params(state)
    summary = summarise(cfg, records, final, b.spec.build(), wall_before + time.perf_counter() - t_start)
    eff, dense = method.inference_flops_per_sample(final, b.data.x_test)
    summary["inference_flops_per_sample"] = eff
    summary["inference_flops_per_sample_dense"] = dense
    _write_artifacts(folder, state, final, b.spec.build(), records)
    folder.write_summary(summary)
    return {**summary, "status": "completed"}


def summarise(
    cfg: ExperimentConfig, records: list[dict[str, Any]], final: dict[str, torch.Tensor], model: nn.Module, wall: float
) -> dict[str, Any]:
    """The ``summary.json`` contents from the per-round records and the final global model."""
    accs = [r["accuracy"] for r in records if r["accuracy"] is not None]
    return {
        "method": cfg.method.name,
        "sparsity": cfg.method.sparsity,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": next((r["loss"] for r in reversed(records) if r["loss"] is not None), None),
        "rounds": len(records),
        "num_params": sum(
            v.numel() for k, v in final.items() if v.is_floating_point() and k in dict(model.named_parameters())
        ),
        "density": _prunable_density(model, final),
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in records),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in records),
        "train_flops_total": sum(r["train_flops"] for r in records),
        "train_flops_dense_total": sum(r["train_flops_dense"] for r in records),
        "client_seconds_total": sum(r["client_seconds"] for r in records),
        "wall_seconds": wall,
        "model_sha256": state_sha256(final),
        "failures_total": sum(len(r["failures"]) for r in records),
    }


def _write_artifacts(
    folder: RunFolder,
    state: ServerState,
    final: dict[str, torch.Tensor],
    model: nn.Module,
    records: list[dict[str, Any]],
) -> None:
    from safetensors.torch import save

    atomic_write_bytes(folder.path / "model.safetensors", save({k: v.contiguous() for k, v in final.items()}))
    mask = state.mask if state.mask is not None else Mask({n: final[n] != 0 for n in default_scope(model)})
    mask.save(folder.path / "mask.safetensors")
    from sparsefl.experiment.plots import plot_run

    plot_run(folder.path, records)
