"""Where a process computes: the ``device`` option resolved to a torch device, and the executor.

``device`` is ``auto`` (the first CUDA device torch sees, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``; :data:`sparsefl.config.DEVICE_PATTERN` checks the spelling, :func:`resolve_device`
checks that this machine has the device. Each process of a run resolves it for itself:
:func:`assign_device` spreads ``jobs`` worker processes over the visible GPUs (worker ``k`` of
``G`` devices gets ``cuda:(k mod G)``; this process is worker 0), and ``cuda:N`` puts every
process on device ``N``. A CPU device changes nothing: no tensor moves and no global setting.

On a CUDA device :func:`prepare_device` asks torch for deterministic kernels (the same config on
the same GPU model gives the same bits); an operation that has none warns instead of failing.

``federation.executor`` chooses how a process trains its clients (:func:`choose_executor`): one
after another (``sequential``, :func:`sparsefl.runtime.client.execute_task`) or a round's
clients at once (``batched``, :mod:`sparsefl.runtime.batched`, where present).
"""

from __future__ import annotations

import os
import platform

import torch

from sparsefl.config import ExperimentConfig
from sparsefl.errors import ConfigError
from sparsefl.methods.base import Method
from sparsefl.runtime.batched import unsupported_reason

#: cuBLAS's reproducible workspace setting; read when cuBLAS starts, so set before any CUDA work.
CUBLAS_WORKSPACE = ":4096:8"


def assign_device(requested: str, worker: int, visible: int) -> str:
    """The device of process ``worker`` (0 = the process that started the run) of a run asking
    for ``requested`` on a machine with ``visible`` CUDA devices.

    ``cpu`` and ``cuda:N`` are taken as they are; ``cuda`` and ``auto`` give ``cuda:(worker mod
    visible)``, and ``auto`` without a CUDA device gives ``cpu``. A pure function (no device
    is looked at), so the assignment is testable anywhere.
    """
    if requested == "cpu" or requested.startswith("cuda:"):
        return requested
    if visible <= 0:
        return "cpu"
    return f"cuda:{worker % visible}"


def resolve_device(requested: str, worker: int = 0) -> torch.device:
    """The torch device of process ``worker`` for the ``device`` option ``requested``.

    Raises
    ------
    ConfigError
        ``cuda`` or ``cuda:N`` where torch sees no such CUDA device.
    """
    if requested == "cpu":  # nothing asks torch about CUDA: a CPU run stays as it was
        return torch.device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested != "auto" and visible == 0:
        why = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError("device", requested, f"auto or cpu on this machine (torch {torch.__version__}: {why})")
    name = assign_device(requested, worker, visible)
    if name.startswith("cuda:") and int(name[5:]) >= visible:
        raise ConfigError("device", requested, f"auto, cpu, cuda or cuda:0 to cuda:{visible - 1} ({visible} visible)")
    return torch.device(name)


def prepare_device(device: torch.device) -> None:
    """Make this process's kernels on ``device`` deterministic (CUDA only; a no-op on the CPU).

    Sets ``CUBLAS_WORKSPACE_CONFIG`` (unless the user set it), deterministic algorithms (an
    operation without a deterministic CUDA kernel warns rather than stops the run) and turns
    off cuDNN's benchmark mode, whose choice of kernel depends on timing.
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.cuda.set_device(device)


def device_name(device: torch.device) -> str:
    """What ``device`` is, in words: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def choose_executor(cfg: ExperimentConfig, device: torch.device, method: Method, flower: bool = False) -> str:
    """``"sequential"`` or ``"batched"``: how this run trains its clients.

    ``auto`` is batched on a CUDA device when the method can run batched, the run has one job
    (worker processes spread clients over GPUs instead), no client deadline is set and the
    engine is the embedded one; else sequential.

    Raises
    ------
    ConfigError
        ``federation.executor = "batched"`` where it cannot run: the method cannot (the reason
        is the batched executor's), ``jobs > 1``, a client deadline, or a Flower engine.
    """
    fed = cfg.federation
    if fed.executor == "sequential":
        return "sequential"
    reason = unsupported_reason(method)
    if fed.executor == "auto":
        ok = device.type == "cuda" and reason is None and cfg.jobs == 1 and fed.client_timeout == 0 and not flower
        return "batched" if ok else "sequential"
    key, allowed = "federation.executor", "sequential or auto"
    if reason is not None:
        raise ConfigError(key, "batched", f"{allowed}: method {cfg.method.name!r} cannot run batched ({reason})")
    if cfg.jobs > 1:
        raise ConfigError(key, "batched", f"{allowed} with jobs={cfg.jobs} (batched rounds run in one process)")
    if fed.client_timeout > 0:
        raise ConfigError(
            key, "batched", f"{allowed} with federation.client_timeout > 0 (a batched round cannot drop one client)"
        )
    if flower:
        raise ConfigError(key, "batched", f"{allowed} with engine={cfg.engine} (Flower nodes run clients one by one)")
    return "batched"
