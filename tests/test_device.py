"""The ``device`` option, the worker-to-GPU assignment and the executor choice and dispatch."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparsefl.cli.main import main
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, config_hash, load_config
from sparsefl.engines import embedded
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.registry import METHODS
from sparsefl.runtime import client, device
from sparsefl.runtime.device import assign_device, choose_executor, resolve_device
from sparsefl.runtime.server import Server
from sparsefl.state import clone_state

from .conftest import tiny_overrides

#: model_sha256 of the default run (``sparsefl run`` with no options) on a CPU
DEFAULT_SHA_PREFIX = "ec270f6f"


@pytest.mark.parametrize(
    ("requested", "worker", "visible", "expected"),
    [
        ("cpu", 3, 4, "cpu"),
        ("auto", 0, 0, "cpu"),
        ("auto", 5, 0, "cpu"),
        ("auto", 0, 2, "cuda:0"),
        ("cuda", 0, 1, "cuda:0"),
        ("cuda", 1, 2, "cuda:1"),
        ("cuda", 2, 2, "cuda:0"),
        ("auto", 7, 4, "cuda:3"),
        ("cuda:1", 0, 4, "cuda:1"),  # a named device holds every process
        ("cuda:1", 6, 4, "cuda:1"),
    ],
)
def test_assign_device_spreads_workers_over_the_visible_gpus(requested, worker, visible, expected):
    assert assign_device(requested, worker, visible) == expected


def test_resolve_device_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda:0")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match="'device'.*auto or cpu"):
                resolve_device(name)


def test_resolve_device_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda", worker=3) == torch.device("cuda:1")
    assert resolve_device("cuda:1", worker=2) == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"'device'.*cuda:0 to cuda:1 \(2 visible\)"):
        resolve_device("cuda:2")


def test_worker_ordinals_count_from_one():
    counter = mp.get_context("fork").Value("i", 0)
    assert [embedded._ordinal(counter) for _ in range(3)] == [1, 2, 3]
    assert embedded._ordinal(5) == 5


def test_cuda_workers_are_never_forked(monkeypatch, tiny_cfg):
    monkeypatch.setattr(embedded, "forks", lambda threads: True)
    b = build(tiny_cfg)
    assert embedded.DeadlineWorkers(b.method, b.data.x_train, b.data.y_train, b.split, 1)._fork
    cuda = embedded.DeadlineWorkers(b.method, b.data.x_train, b.data.y_train, b.split, 1, "cuda", cuda=True)
    assert not cuda._fork  # from the fork server


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", "cpu:0"])
def test_device_spelling_is_checked_in_the_config(bad):
    with pytest.raises(ConfigError, match="'device'.*auto, cpu, cuda or cuda:N"):
        load_config(overrides=[f"device={bad!r}"])


def test_device_is_not_part_of_a_runs_identity_but_the_executor_is():
    base = config_hash(ExperimentConfig())
    assert config_hash(load_config(overrides=["device='cpu'"])) == base
    assert config_hash(load_config(overrides=["federation.executor='sequential'"])) != base
    with pytest.raises(ConfigError, match="'federation.executor'.*auto, sequential, batched"):
        load_config(overrides=["federation.executor='vmap'"])


def test_on_device_moves_every_tensor_and_keeps_the_shape_of_the_value():
    upd = Update(values={"w": torch.ones(2)}, sent={"w": torch.tensor([True, False])})
    moved, state, nothing = client.on_device((upd, {"a": [torch.zeros(1)]}, None), torch.device("meta"))
    assert isinstance(moved, Update) and moved.values["w"].is_meta and moved.sent["w"].is_meta
    assert state["a"][0].is_meta and nothing is None
    cpu = torch.zeros(3)
    assert client.on_device(cpu, torch.device("cpu")) is cpu  # no copy on the same device


def _fake_batched(reason: str | None, calls: list[int]):  # type: ignore[no-untyped-def]
    """A stand-in for sparsefl.runtime.batched: the sequential clients, one call per round."""

    def run_batched(method, data_source, tasks, states):  # type: ignore[no-untyped-def]
        calls.append(len(tasks))
        return [client.execute_task(method, data_source, t, s) for t, s in zip(tasks, states, strict=True)]

    return SimpleNamespace(unsupported_reason=lambda method: reason, run_batched=run_batched)


def _use_batched(monkeypatch, module) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(device, "unsupported_reason", module.unsupported_reason)
    monkeypatch.setattr(embedded, "run_batched", module.run_batched)


def test_choose_executor(monkeypatch):
    cfg = load_config(overrides=tiny_overrides())
    method = build(cfg).method
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device value, not a CUDA call
    _use_batched(monkeypatch, _fake_batched(None, []))
    assert choose_executor(cfg, cpu, method) == "sequential"  # auto: batched only on a GPU
    assert choose_executor(cfg, cuda, method) == "batched"
    seq = load_config(overrides=tiny_overrides(**{"federation.executor": "sequential"}))
    assert choose_executor(seq, cuda, method) == "sequential"
    batched = load_config(overrides=tiny_overrides(**{"federation.executor": "batched"}))
    assert choose_executor(batched, cpu, method) == "batched"
    timed = load_config(overrides=tiny_overrides(**{"federation.client_timeout": 5.0}))
    assert choose_executor(timed, cuda, method) == "sequential"
    timed_batched = load_config(
        overrides=tiny_overrides(**{"federation.client_timeout": 5.0, "federation.executor": "batched"})
    )
    with pytest.raises(ConfigError, match="client_timeout"):
        choose_executor(timed_batched, cuda, method)

    _use_batched(monkeypatch, _fake_batched("its hooks are not functional", []))
    assert choose_executor(cfg, cuda, method) == "sequential"  # auto falls back silently
    with pytest.raises(ConfigError, match="method 'fedavg' cannot run batched \\(its hooks are not functional\\)"):
        choose_executor(batched, cuda, method)
    _use_batched(monkeypatch, _fake_batched(None, []))
    # worker processes (jobs > 1) and Flower nodes run clients one by one
    jobs = load_config(overrides=tiny_overrides(jobs=2))
    assert choose_executor(jobs, cuda, method) == "sequential"
    assert choose_executor(cfg, cuda, method, flower=True) == "sequential"
    jobs_batched = load_config(overrides=tiny_overrides(**{"jobs": 2, "federation.executor": "batched"}))
    with pytest.raises(ConfigError, match="jobs=2"):
        choose_executor(jobs_batched, cuda, method)
    with pytest.raises(ConfigError, match="engine="):
        choose_executor(batched, cuda, method, flower=True)


def test_batched_executor_is_dispatched_and_recorded(tmp_path, monkeypatch):
    seq = run_experiment(load_config(overrides=tiny_overrides(**{"federation.executor": "sequential"})), tmp_path / "s")
    calls: list[int] = []
    _use_batched(monkeypatch, _fake_batched(None, calls))
    cfg = load_config(overrides=tiny_overrides(**{"federation.executor": "batched"}))
    out = run_experiment(cfg, tmp_path / "b")
    assert calls == [3, 3, 3]  # every round's clients in one call, none in worker processes
    assert out["executor"] == "batched" and seq["executor"] == "sequential"
    assert out["device"] == "cpu" == seq["device"] and out["device_name"]
    assert out["model_sha256"] == seq["model_sha256"]  # the stand-in runs the sequential clients


def test_unsupported_batched_method_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    _use_batched(monkeypatch, _fake_batched("it keeps per-step state", []))
    code = main(["run", "--set", "federation.executor=batched", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "method 'fedavg' cannot run batched (it keeps per-step state)" in err
    assert not (tmp_path / "x").exists()


def test_cli_device_flag(tmp_path, capsys):
    assert main(["run", "--device", "gpu", "--out", str(tmp_path / "x")]) == 2
    assert "config key 'device': got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "--device", "cuda:0", "--out", str(tmp_path / "y")]) == 2
        assert "auto or cpu on this machine" in capsys.readouterr().err
    tiny = [a for o in tiny_overrides(**{"federation.rounds": 1}) for a in ("--set", o)]
    assert main(["run", "--device", "cpu", *tiny, "--out", str(tmp_path / "z")]) == 0
    assert (tmp_path / "z" / "summary.json").read_text().count('"device": "cpu"') == 1


def test_default_run_keeps_its_bits_with_device_cpu_and_auto(tmp_path):
    """The default run (digits, fedavg, 30 rounds) on a CPU: the same model as before the
    device option, whether the device is named or chosen."""
    if torch.cuda.is_available():
        pytest.skip("device=auto picks the GPU here")
    shas = {
        d: run_experiment(load_config(overrides=[f"device='{d}'"]), tmp_path / d)["model_sha256"]
        for d in ("cpu", "auto")
    }
    assert shas["cpu"] == shas["auto"]
    assert shas["cpu"].startswith(DEFAULT_SHA_PREFIX)


class _MetaValues(TorchFunctionMode):
    """Data-dependent reads of meta tensors give made-up values (ones, every entry kept), so a
    client's round on the meta device runs far enough for a device mismatch to show: the meta
    device stands in for a GPU on a machine without one (meta and CPU tensors do not mix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        t = args[0] if args else None
        if not (isinstance(t, torch.Tensor) and t.is_meta):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("item", "__float__", "__int__", "__index__"):
            return 1.0 if name == "__float__" or (name == "item" and t.is_floating_point()) else 1
        if name in ("__bool__", "equal", "allclose"):
            return True
        if name == "tolist":
            return torch.ones(t.shape, dtype=t.dtype).tolist()
        if name in ("cpu", "numpy"):
            ones = torch.ones(t.shape, dtype=t.dtype)
            return ones.numpy() if name == "numpy" else ones
        if name == "to":
            dev = kwargs.get("device", args[1] if len(args) > 1 and isinstance(args[1], (str, torch.device)) else None)
            if dev is not None and torch.device(dev).type == "cpu":
                return torch.ones(t.shape, dtype=kwargs.get("dtype", t.dtype))
        if name == "nonzero":
            n = t.numel()
            if kwargs.get("as_tuple"):
                return tuple(torch.arange(n, device="meta") for _ in range(max(t.dim(), 1)))
            return torch.empty((n, max(t.dim(), 1)), dtype=torch.long, device="meta")
        if name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            return torch.empty((args[1].numel(), *t.shape[args[1].dim() :]), dtype=t.dtype, device="meta")
        if name == "masked_select":
            return torch.empty((t.numel(),), dtype=t.dtype, device="meta")
        return func(*args, **kwargs)


class _NoEngine:
    def run(self, tasks, on_result=None):  # type: ignore[no-untyped-def]
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def _method_cases(tmp_path) -> list[tuple[str, list[str]]]:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    teacher = tmp_path / "teacher.safetensors"
    b = build(load_config(overrides=tiny_overrides()))
    save_file({k: v.contiguous() for k, v in b.spec.build().state_dict().items()}, str(teacher))
    # schedules that fire from round 1 in 3 rounds (a default one never fires, which is an error)
    schedules = {
        "feddst": ["method.delta_r=1", "method.r_end=1.0"],
        "fedtiny": ["method.adjust_every=1", "method.adjust_until=1.0"],
        "fedrts": ["method.adjust_every=1", "method.adjust_until=1.0"],
    }
    cases = [(n, [f"method.name='{n}'", *schedules.get(n, [])]) for n in sorted(METHODS.names()) if n != "kd"]
    cases += [
        (f"kd-{m}", ["method.name='kd'", f"method.kd='{m}'", f"method.kd_teacher='{teacher}'"])
        for m in ("logit", "feature")
    ]
    variants = {  # options that take other code paths on the client
        "static_mask-snip-client": ["method.criterion='snip'", "method.score_source='client'"],
        "static_mask-compact": ["method.criterion='skeletonization'", "method.compact=true"],
        "fedskel-mask": ["method.backward='mask'"],
        "dynamic-threshold": ["method.variant='threshold'"],
        "hidenseek-carry-none": ["method.carry='none'"],
    }
    cases += [(k, [f"method.name='{k.split('-')[0]}'", *v]) for k, v in variants.items()]
    return cases


def test_every_method_keeps_its_client_round_on_the_datas_device(tmp_path, monkeypatch):
    """Each registered method's client round (two rounds, with a validation split) with the
    client's data on another device than the CPU: every tensor a hook makes or reads must be
    on the model's device. The meta device stands in for the GPU."""
    auto = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == "meta" else auto(*a))
    reached_end = []
    cases = _method_cases(tmp_path)
    assert {label.split("-")[0] for label, _ in cases} == set(METHODS.names())
    for label, extra in cases:
        cfg = load_config(overrides=[*tiny_overrides(**{"data.val_fraction": 0.2}), *extra])
        b = build(cfg)
        m = b.method
        state = m.init_state(clone_state(b.spec.build().state_dict()), (b.data.x_train[:64], b.data.y_train[:64]))
        server = Server(cfg, m, _NoEngine(), b.data.x_test, b.data.y_test)
        data = client.ClientDataSource(b.data.x_train, b.data.y_train, b.split, torch.device("meta"))(0)
        kept: dict = {}
        try:
            with _MetaValues():
                for rnd in (1, 2):
                    result = client._client_round(server.make_tasks(state, rnd, [0])[0], m, data, kept)
                    kept = result.state
                    assert all(v.device.type == "cpu" for v in kept.values() if isinstance(v, torch.Tensor))
        except RuntimeError as e:
            where = " < ".join(
                [
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                    for f in traceback.extract_tb(e.__traceback__)[::-1]
                    if "sparsefl" in f.filename
                ][:4]
            )
            text = f"{e} {e.__cause__}"
            mixed = "device" in text and "meta" in text
            assert not mixed, f"{label}: {text} ({where})"
            raise AssertionError(f"{label}: the round stopped before its end: {e} ({where})") from e
        else:
            reached_end.append(label)
    assert reached_end == [label for label, _ in cases]
