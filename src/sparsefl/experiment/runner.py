"""Build an experiment from its config and run it into a run folder.

``build`` wires data -> partition -> model -> method -> engine, and checks that the model takes
the data; ``run_experiment`` holds the run folder's lock, validates everything it can before it
writes the first file, then drives the server loop, writing metrics and an atomic checkpoint
after every round, and the summary, final model, mask and plots at the end. Re-running on an
existing folder resumes from the newest checkpoint of this run whose metrics lines are intact,
or reports a finished run. A run that fails before its first checkpoint leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import sparsefl.methods  # noqa: F401  (fills the method registry)
from sparsefl.accounting import profile_model
from sparsefl.config import ExperimentConfig, config_hash, flatten, to_dict
from sparsefl.data import ClientSplit, Dataset, load_dataset, make_partition
from sparsefl.engines.embedded import EmbeddedEngine, start_fork_server
from sparsefl.errors import ConfigError
from sparsefl.experiment.plots import plot_run
from sparsefl.experiment.preprocess import InputTransform
from sparsefl.experiment.report import write_metrics_csv
from sparsefl.experiment.runfolder import RunFolder, checkpoint_bytes
from sparsefl.experiment.tblog import TensorBoardLog, require_tensorboard
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Method
from sparsefl.models import ModelSpec, build_model
from sparsefl.protocol.messages import ServerState
from sparsefl.registry import METHODS
from sparsefl.runtime.client import torch_threads
from sparsefl.runtime.device import choose_executor, device_name, prepare_device, resolve_device
from sparsefl.runtime.divergence import divergence_warning, round_train_loss
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
    transform: InputTransform  # raw inputs -> the model's


def build(cfg: ExperimentConfig, model: nn.Module | None = None, data: Dataset | None = None) -> Built:
    """Load data, partition it, build the model and the method (nothing runs yet).

    Raises
    ------
    ConfigError
        The model does not take the data's inputs or does not give one logit per class.
    """
    data = data if data is not None else load_dataset(cfg.data, cfg.seed)
    transform = InputTransform.of_data(data)
    split = make_partition(data, cfg.federation.num_clients, cfg.data, cfg.seed)
    if model is None:
        model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
        check_model(model, data.input_shape, data.num_classes, "model.name", cfg.model.name)
    else:
        check_model(model, data.input_shape, data.num_classes, "model", type(model).__qualname__)
    spec = ModelSpec(model, data.input_shape, data.num_classes)
    return Built(cfg, data, split, spec, make_method(cfg, spec), transform)


def make_method(cfg: ExperimentConfig, spec: ModelSpec) -> Method:
    """The method ``cfg.method`` names, for the model ``spec``."""
    profile = profile_model(spec.build(), spec.input_shape)
    method_cls = METHODS.get(cfg.method.name)
    return method_cls(cfg.method, cfg, spec, profile)


def check_model(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, key: str, name: str) -> None:
    """Fail now, in one line, if ``model`` cannot take a batch of ``input_shape`` samples or
    does not return ``num_classes`` logits per sample (rather than in round 1, on the clients).
    The model is left as it was (a copy runs, in eval mode; the global RNG is restored)."""
    probe = copy.deepcopy(model).eval()
    shape = ", ".join(str(d) for d in input_shape)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = probe(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - whatever the forward raises, the model does not fit the data
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            key, name, f"a model taking inputs of shape (N, {shape}) (its forward failed: {why})"
        ) from None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ConfigError(key, name, f"a model returning N x {num_classes} logits (it returned {got} for N = 2)")


def pooled_validation(b: Built) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every client's validation split (``data.val_fraction``) in one set, for the global
    model's ``val_accuracy``; (None, None) without one."""
    if not any(len(v) for v in b.split.val):
        return None, None
    idx = torch.from_numpy(np.concatenate(b.split.val))
    return b.data.x_train[idx], b.data.y_train[idx]


def _prunable_density(model: nn.Module, params: dict[str, torch.Tensor]) -> float:
    names = default_scope(model)
    total = sum(params[n].numel() for n in names)
    kept = sum(int((params[n] != 0).sum()) for n in names)
    return kept / total if total else 1.0


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


ProgressFn = Callable[[RoundRecord, dict[str, Any]], None]


#: Config keys that may name an input file whose contents a run depends on.
INPUT_FILE_KEYS = ("data.dir", "method.mask_file", "method.kd_teacher", "method.student.mask_file")


def input_files(cfg: ExperimentConfig) -> dict[str, str]:
    """The SHA-256 of each input file the config names (a folder of files, such as CIFAR's
    batches or a LEAF folder, is not hashed), by config key."""
    flat = flatten(to_dict(cfg))
    out = {}
    for key in INPUT_FILE_KEYS:
        path = flat.get(key)
        if isinstance(path, str) and path and Path(path).is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[key] = digest.hexdigest()
    return out


def model_identity(model: nn.Module | None) -> dict[str, str] | None:
    """A user module's identity in its run folder: its class and the SHA-256 of its initial
    parameters (None for the registered model the config names)."""
    if model is None:
        return None
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "init_sha256": state_sha256(model.state_dict())}


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

    An existing folder with the same config (and user module) resumes from its last good
    checkpoint (or returns the finished run's summary, unless ``force``); a different config
    there is refused, as is a folder another run holds. The data, the model and the method are
    built before the folder is written to, and a run that fails before its first checkpoint
    removes what it wrote, so a corrected command starts cleanly.

    Each round is evaluated and recorded (metrics line, checkpoint, then ``progress``) in a
    server thread while the next round trains, in round order; ``progress`` is called there.
    """
    if cfg.engine != "embedded" and engine is None:
        raise ConfigError("engine", cfg.engine, "'embedded' here (Flower engines run through sparsefl.run or the CLI)")
    folder = RunFolder(out)
    model_id, inputs = model_identity(model), input_files(cfg)
    with folder.lock():
        if not force and folder.check(cfg, model_id, inputs) == "finished":
            summary = folder.read_summary()
            assert summary is not None
            return {**summary, "status": "finished"}
        t_start = time.perf_counter()
        device = resolve_device(cfg.device)  # a device this machine lacks: refused before any work
        prepare_device(device)  # before any CUDA work here, and before the fork server starts
        if engine is None and cfg.jobs > 1:
            # it imports torch while the data and the model are built
            start_fork_server(cfg.local.threads, device.type == "cuda")
        b = build(cfg, model)
        # an engine given by the caller (Flower) runs each client with execute_task, where it runs
        executor = choose_executor(cfg, device, b.method, flower=engine is not None)
        if cfg.log.tensorboard:
            require_tensorboard()
        if force:
            folder.reset()
        status = folder.claim(cfg, model_id, inputs)
        try:
            return _run(b, folder, status, t_start, progress, log, engine, device, executor)
        except BaseException:
            folder.drop_temporaries()
            if status == "new" and not folder.has_checkpoint():
                folder.reset()  # nothing of this run to resume: the folder is as unclaimed
            raise


def _run(
    b: Built,
    folder: RunFolder,
    status: str,
    t_start: float,
    progress: ProgressFn | None,
    log: Callable[[str], None] | None,
    engine: Engine | None,
    device: torch.device,
    executor: str,
) -> dict[str, Any]:
    """:func:`run_experiment` once the folder is claimed: resume or start, run the rounds,
    write the final files. Clients train and the global model is evaluated on ``device``;
    ``executor`` is how this process trains its clients (both are recorded in the summary)."""
    cfg, method = b.cfg, b.method
    store = ClientStateStore(folder.path / "clients" if cfg.federation.client_state == "disk" else None)
    if engine is None:
        engine = EmbeddedEngine(
            method, b.data.x_train, b.data.y_train, b.split, cfg.jobs, store, device=cfg.device, executor=executor
        )
    # one server thread: it evaluates and records each round while the next one trains. The
    # evaluation is mostly long kernels, which release the GIL, so it takes a free core (when
    # there is one: its intra-op threads come on top of the training's). Uploads are decoded in
    # the training thread: decoding here would contend with training for the GIL.
    background = ThreadPoolExecutor(
        1, thread_name_prefix="sparsefl-server", initializer=torch.set_num_threads, initargs=(cfg.local.threads,)
    )
    overlap = 2 * cfg.local.threads <= _usable_cpus()
    cfg_hash = config_hash(cfg)  # once, not per round
    try:  # the engine's worker processes are shut down whatever happens next
        x_val, y_val = pooled_validation(b)
        server = Server(
            cfg, method, engine, b.data.x_test, b.data.y_test, store=store, device=device, x_val=x_val, y_val=y_val
        )

        if status == "resume" and log is not None:
            for name in folder.damaged_checkpoints():
                log(f"{folder.path / name} is damaged (hash mismatch or truncated); using the previous good checkpoint")
        ckpt: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        # the newest good checkpoint of this run whose rounds metrics.jsonl holds, as they were
        # when it was written (each line is fsync'ed before the checkpoint that counts it, so
        # only a damaged or edited file lacks them; the previous checkpoint may still be covered)
        for path, ck in folder.checkpoints() if status == "resume" else ():
            if ck.get("config_hash") != cfg_hash:
                problem = f"{path} belongs to another configuration's run; not resuming from it"
            else:
                recs, problem = folder.covered_records(ck)
                if recs is not None:
                    ckpt, records = ck, recs
                    break
            if log is not None:
                log(problem)
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
        tb = TensorBoardLog(folder.path, first_round=state.round + 1) if cfg.log.tensorboard else None

        def finish(record: RoundRecord, snapshot: dict[str, Any], keep: dict[int, int]) -> None:
            """The end of a round, in the server thread while the next round trains: evaluate
            (the checkpoint's copy of the state), then the metrics line, the checkpoint (durable
            in that order, the checkpoint holding the digest of the lines it covers), the client
            files no checkpoint needs any more, and progress. The loop waits for each round end
            before queuing the next, so a failed one stops the run and nothing after it is
            recorded."""
            server.evaluate_round(state_of(snapshot), record)
            if b.method.loss_is_cross_entropy:
                losses = [round_train_loss(r["clients"]) for r in records] + [round_train_loss(record.clients)]
                record.warning = divergence_warning(losses, b.spec.num_classes, cfg.local.lr)
            if record.warning is not None and log is not None:
                log(f"{folder.path}: round {record.round}: {record.warning}")
            records.append(record.to_json())
            folder.append_metrics(records[-1])
            if tb is not None:
                tb.log(records[-1])
            snapshot["metrics_sha256"] = folder.metrics_sha256()
            folder.write_checkpoint(checkpoint_bytes(snapshot))
            store.commit(record.round, keep)
            if progress is not None:
                progress(record, {"rounds": cfg.federation.rounds})

        pending: Future[None] | None = None
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
            if tb is not None:
                tb.close()
    finally:
        engine.close()

    final = method.eval_params(state)
    summary = summarise(cfg, records, final, b.spec.build(), wall_before + time.perf_counter() - t_start)
    eff, dense = method.inference_flops_per_sample(final, b.data.x_test)
    summary["inference_flops_per_sample"] = eff
    summary["inference_flops_per_sample_dense"] = dense
    summary["device"] = str(device)
    summary["device_name"] = device_name(device)
    summary["executor"] = executor
    _write_artifacts(folder, b, state, final, records)
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
        "warnings": [f"round {r['round']}: {r['warning']}" for r in records if r.get("warning")],
    }


def _write_artifacts(
    folder: RunFolder, b: Built, state: ServerState, final: dict[str, torch.Tensor], records: list[dict[str, Any]]
) -> None:
    """The final model, what it takes and gives (``model.json``), its mask, and the plots."""
    from safetensors.torch import save

    atomic_write_bytes(folder.path / "model.safetensors", save({k: v.contiguous() for k, v in final.items()}))
    transform = b.transform
    folder.write_model_info(
        {
            "input_shape": list(b.spec.input_shape),
            "num_classes": b.spec.num_classes,
            "input_transform": transform.to_json(),
        }
    )
    model = b.spec.build()
    mask = state.mask if state.mask is not None else Mask({n: final[n] != 0 for n in default_scope(model)})
    mask.save(folder.path / "mask.safetensors")
    plot_run(folder.path, records, label=f"{b.cfg.method.name} on {b.cfg.data.name}")
    write_metrics_csv(folder.path / "metrics.csv", records)
