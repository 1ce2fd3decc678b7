"""A finished run's model, for use outside sparsefl: :func:`load_run` and the exports.

:func:`load_run` rebuilds the trained global model from the run folder (``config.json``,
``model.json``, ``model.safetensors``, ``mask.safetensors``): the registered model the config
names, or the user module the caller passes (a module of the class the run recorded), wrapped
as the method evaluates it. With its :class:`~sparsefl.experiment.preprocess.InputTransform`,
raw inputs give the logits the run's evaluation computed.

:func:`export_safetensors` writes the weights with the mask applied, every tensor the mask
thins stored as flat indices and values, plus the input normalisation;
:func:`export_onnx` writes one ONNX graph of the transform followed by the model. The file
layouts are described in ``docs/run-folder.md``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsefl.config import ExperimentConfig, from_dict
from sparsefl.errors import ConfigError, RunFolderError
from sparsefl.experiment.preprocess import InputTransform
from sparsefl.experiment.runfolder import RunFolder
from sparsefl.experiment.runner import make_method
from sparsefl.masks import Mask
from sparsefl.models import ModelSpec, build_model
from sparsefl.state import atomic_write_bytes

#: ``format`` in the metadata of :func:`export_safetensors` files
SPARSE_FORMAT = "sparsefl-sparse-1"


@dataclass
class LoadedRun:
    """A finished run's trained global model and what it needs.

    ``model(transform(x))`` gives the logits of raw inputs ``x``. ``model`` is in eval mode;
    ``mask`` marks the kept weights (state-dict name -> bool tensor).
    """

    path: Path
    config: ExperimentConfig
    summary: dict[str, Any]
    model: nn.Module
    mask: Mask
    transform: InputTransform


def load_run(path: str | Path, model: nn.Module | None = None) -> LoadedRun:
    """The trained model of the finished run in ``path``.

    Parameters
    ----------
    path:
        A run folder holding a finished run.
    model:
        For a run of a user module: a module of the same class (its weights are not used; it is
        copied, not changed). None for a registered model, which is rebuilt from the config.

    Raises
    ------
    RunFolderError
        The folder holds no finished run, a file is damaged, or ``model`` is not of the class
        the run trained.
    """
    folder = RunFolder(path)
    conf = folder.run_config()
    summary = folder.read_summary()
    if summary is None:
        raise RunFolderError(f"{folder.path} holds no finished run (no summary.json); rerun it to finish it")
    shape, classes, transform = _model_info(folder)
    cfg = from_dict({k: v for k, v in conf.items() if not k.startswith("_")})
    template = _template(folder, conf, cfg, model, shape, classes)
    net = make_method(cfg, ModelSpec(template, shape, classes)).new_model()
    state = _read_tensors(folder.path / "model.safetensors")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunFolderError(f"{folder.path / 'model.safetensors'} does not fit the model: {_first_line(e)}") from None
    mask = Mask(_read_tensors(folder.path / "mask.safetensors"))
    return LoadedRun(folder.path, cfg, summary, net.eval(), mask, transform)


def _template(
    folder: RunFolder,
    conf: dict[str, Any],
    cfg: ExperimentConfig,
    model: nn.Module | None,
    shape: tuple[int, ...],
    classes: int,
) -> nn.Module:
    """The model to rebuild: the config's registered model, or the caller's module, checked
    against the class the run recorded."""
    ran = conf.get("_model")
    if ran is None:
        if model is not None:
            raise RunFolderError(
                f"{folder.path} trained the registered model '{cfg.model.name}'; call load_run without model="
            )
        return build_model(cfg.model, shape, classes, cfg.seed)
    if model is None:
        raise RunFolderError(
            f"{folder.path} trained the user module {ran.get('class')}; pass one as load_run(..., model=)"
        )
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if cls != ran.get("class"):
        raise RunFolderError(f"{folder.path} trained the user module {ran.get('class')}, not {cls}")
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing; rerun with --force to write it again") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise RunFolderError(f"{path} is damaged ({_first_line(e)}); rerun with --force to write it again") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# -- exports ----------------------------------------------------------------------------------------


def export_safetensors(path: str | Path, out: str | Path) -> None:
    """Write the finished run in ``path`` to the safetensors file ``out``, sparse.

    Each tensor the mask thins (removes at least one entry of) is stored as ``NAME:indices``
    (flat row-major positions of the kept entries, int32, or int64 from 2^31 entries) and
    ``NAME:values``; every other tensor densely under its name. The input normalisation, if
    any, is ``input:mean`` and ``input:std``. The metadata holds ``format``, ``input_shape``
    and ``shapes`` (JSON: each sparse tensor's shape). No module is needed.
    """
    from safetensors.torch import save

    folder = RunFolder(path)
    if folder.read_summary() is None:
        raise RunFolderError(f"{folder.path} holds no finished run (no summary.json); rerun it to finish it")
    shape, _, transform = _model_info(folder)
    weights = _read_tensors(folder.path / "model.safetensors")
    mask = _read_tensors(folder.path / "mask.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in weights.items():
        keep = mask.get(name)
        if keep is None or bool(keep.all()):
            tensors[name] = t.contiguous()
            continue
        index_type = torch.int32 if t.numel() < 2**31 else torch.int64
        kept = keep.reshape(-1).nonzero().squeeze(1)
        tensors[f"{name}:indices"] = kept.to(index_type)
        tensors[f"{name}:values"] = t.reshape(-1)[kept].contiguous()
        shapes[name] = list(t.shape)
    if transform.mean is not None and transform.std is not None:
        tensors["input:mean"], tensors["input:std"] = transform.mean, transform.std
    meta = {"format": SPARSE_FORMAT, "input_shape": json.dumps(list(shape)), "shapes": json.dumps(shapes)}
    _write(out, save(tensors, metadata=meta))


def _model_info(folder: RunFolder) -> tuple[tuple[int, ...], int, InputTransform]:
    """``model.json``'s input shape, class count and input transform, checked."""
    info = folder.read_model_info()
    if info is None:
        raise RunFolderError(f"{folder.path} has no model.json (an older run); rerun it with --force to write one")
    try:
        shape, classes = tuple(int(d) for d in info["input_shape"]), int(info["num_classes"])
        if not shape or min(shape) < 1 or classes < 1:
            raise ValueError
        return shape, classes, InputTransform.from_json(shape, info["input_transform"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise RunFolderError(f"{folder.path / 'model.json'} is damaged; rerun with --force to write it again") from None


def read_sparse_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(weights, input statistics)`` of an :func:`export_safetensors` file: the dense state
    dict (removed entries zero) and ``{"mean": ..., "std": ...}`` (empty: no normalisation)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SPARSE_FORMAT:
            raise RunFolderError(f"{path} is not a sparsefl export (metadata format {meta.get('format')!r})")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    stats = {k.split(":")[1]: raw.pop(k) for k in ("input:mean", "input:std") if k in raw}
    weights = {k: v for k, v in raw.items() if ":" not in k}
    for name, shape in json.loads(meta["shapes"]).items():
        values = raw[f"{name}:values"]
        dense = torch.zeros(int(torch.tensor(shape).prod()), dtype=values.dtype)
        dense[raw[f"{name}:indices"].long()] = values
        weights[name] = dense.reshape(shape)
    return weights, stats


def export_onnx(run: LoadedRun, out: str | Path) -> None:
    """Write ``run``'s model as an ONNX graph whose first operations are the input transform:
    it takes raw float32 inputs ``N x input_shape`` (any N) and returns ``N x classes`` logits.

    Needs the ``export`` extra (``onnx`` and ``onnxscript``, for ``torch.onnx``'s exporter).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConfigError("--format", "onnx", f"an installed exporter: pip install 'sparsefl[export]' ({e})") from None
    net = nn.Sequential(run.transform, run.model).eval()
    example = torch.zeros(2, *run.transform.input_shape)
    out = Path(out)
    _check_target(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on operators of packages we do not use (torchvision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=["input"],
                output_names=["logits"],
                external_data=False,
                verbose=False,
            )
        assert program is not None
        program.save(str(tmp))
        os.replace(tmp, out)
    except OSError as e:
        raise RunFolderError(f"--out {out}: {e.strerror or e}") from None
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)


def _check_target(out: Path) -> None:
    if out.is_dir():
        raise RunFolderError(f"--out {out} is a folder; name a file")
    if not out.parent.is_dir():
        raise RunFolderError(f"--out {out}: {out.parent} is not an existing folder")


def _write(out: str | Path, data: bytes) -> None:
    out = Path(out)
    _check_target(out)
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        out.with_name(f".{out.name}.tmp-{os.getpid()}").unlink(missing_ok=True)
        raise RunFolderError(f"--out {out}: {e.strerror or e}") from None
