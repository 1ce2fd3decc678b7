"""The batched executor against the sequential one: for every method that can run batched, three
rounds of a tiny digits federation give the same model (up to float reassociation), the same
uplink bytes, FLOPs, steps and metrics; chunking changes nothing; methods that cannot run batched
say which and why."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sparsefl.config import load_config
from sparsefl.errors import DecodeError
from sparsefl.experiment.runner import build
from sparsefl.methods.bn_only import ScaledHooks
from sparsefl.protocol.messages import ClientFailure, ClientResult
from sparsefl.protocol.sampling import sample_clients
from sparsefl.runtime import batched
from sparsefl.runtime.batched import run_batched, unsupported_reason
from sparsefl.runtime.client import ClientDataSource, batch_plan, execute_task, iter_batches
from sparsefl.runtime.server import Server

from .conftest import tiny_overrides

TOL = 1e-4

#: the batched methods, each with a small setting
BATCHED = {
    "fedavg": {"method.name": "fedavg"},
    "static_mask": {"method.name": "static_mask", "method.sparsity": 0.8},
    "bn_only": {"method.name": "bn_only"},
    "bn_only_classifier": {"method.name": "bn_only", "method.train_classifier": True},
    "bn_only_random": {"method.name": "bn_only", "method.trained": "random", "method.bn_lr": 0.1},
    "hidenseek": {"method.name": "hidenseek", "method.sparsity": 0.8, "method.synflow_iterations": 5},
    "zerofl": {"method.name": "zerofl", "method.sparsity": 0.8},
    "zerofl_period": {
        "method.name": "zerofl",
        "method.sparsity": 0.5,
        "method.topk_period": 3,
        "method.sparsify_classifier": True,
        "method.upload": "topk_diff",
    },
    "hidenseek_train_bn": {
        "method.name": "hidenseek",
        "method.sparsity": 0.5,
        "method.synflow_iterations": 5,
        "method.train_bn": True,
    },
}


#: variants compared after fewer rounds: trained BatchNorm and biases move the sign scores through
#: float-reassociated kernels, and a score within rounding of 0 flips its sign and the vote
ROUNDS = {"hidenseek_train_bn": 1}


@pytest.fixture(autouse=True)
def _vectorised_only(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Every client that trains goes through the vectorised path (the one-by-one fallback
    would pass these comparisons trivially), except in the test of the fallback."""
    if "fallback" in request.node.name:
        return
    alone = batched._train_alone

    def check(c, method):  # type: ignore[no-untyped-def]
        assert c.round.hooks is None, "a client trained one by one"
        alone(c, method)

    monkeypatch.setattr(batched, "_train_alone", check)


def _cfg(name: str, **extra: object):  # type: ignore[no-untyped-def]
    over = {"method.name": name, **BATCHED.get(name, {}), **extra}
    return load_config(overrides=tiny_overrides(**over))


def _sequential(method, src, tasks, states):  # type: ignore[no-untyped-def]
    return [execute_task(method, src, t, s) for t, s in zip(tasks, states)]


def _federate(cfg, executor: Callable, rounds: int = 3):  # type: ignore[no-untyped-def]
    """``rounds`` rounds of the server loop's steps with ``executor`` training the clients:
    the final server state and every round's client outcomes."""
    b = build(cfg)
    m = b.method
    params = {k: v.clone() for k, v in b.spec.build().state_dict().items()}
    state = m.init_state(params, (b.data.x_train[:64], b.data.y_train[:64]))
    server = Server(cfg, m, engine=None, x_test=b.data.x_test, y_test=b.data.y_test)  # type: ignore[arg-type]
    src = ClientDataSource(b.data.x_train, b.data.y_train, b.split)
    fed = cfg.federation
    states: dict[int, dict] = {}
    log = []
    for rnd in range(1, rounds + 1):
        clients = sample_clients(cfg.seed, rnd, fed.num_clients, fed.clients_per_round)
        tasks = server.make_tasks(state, rnd, clients)
        outs = executor(m, src, tasks, [dict(states.get(c, {})) for c in clients])
        received = []
        for t, o in zip(tasks, outs, strict=True):
            log.append(o)
            if isinstance(o, ClientResult):
                try:
                    received.append(server.decode(state, o))
                except DecodeError:  # an injected NaN update: dropped, as the server loop does
                    continue
                states[t.client_id] = o.state
                server.setup_of[t.client_id] = server.setup_version(state)
        if received:
            state = m.aggregate(state, received)
    return state, log


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of two state_dicts, relative to each tensor's scale where that is
    above 1 (BatchNorm's running variances)."""
    assert a.keys() == b.keys()
    return max(
        float((a[k].double() - b[k].double()).abs().max() / max(1.0, float(a[k].double().abs().max())))
        if a[k].numel()
        else 0.0
        for k in a
    )


def _assert_same(seq, bat) -> None:  # type: ignore[no-untyped-def]
    (s_state, s_log), (b_state, b_log) = seq, bat
    assert _max_diff(s_state.params, b_state.params) <= TOL
    assert s_state.extra.keys() == b_state.extra.keys()
    if s_state.extra:
        assert _max_diff(dict(s_state.extra), dict(b_state.extra)) <= TOL
    assert len(s_log) == len(b_log)
    for s, b in zip(s_log, b_log, strict=True):
        assert type(s) is type(b) and s.client_id == b.client_id
        if isinstance(s, ClientFailure):
            assert s.reason == b.reason
            continue
        assert len(s.payload) == len(b.payload)
        assert (s.flops, s.flops_dense, s.num_examples) == (b.flops, b.flops_dense, b.num_examples)
        assert s.metrics.keys() == b.metrics.keys() and s.metrics["steps"] == b.metrics["steps"]
        assert abs(s.loss - b.loss) <= TOL
        for k in s.metrics:
            assert abs(s.metrics[k] - b.metrics[k]) <= 0.05  # val accuracy of a few samples
        assert s.state.keys() == b.state.keys()


@pytest.mark.parametrize("name", list(BATCHED))
def test_batched_matches_sequential(name: str) -> None:
    cfg = _cfg(name)
    assert unsupported_reason(build(cfg).method) is None
    rounds = ROUNDS.get(name, 3)
    _assert_same(_federate(cfg, _sequential, rounds), _federate(cfg, run_batched, rounds))


def test_uneven_clients_steps_and_validation_split() -> None:
    """Clients with different numbers of batches (and trailing batches of different sizes),
    two epochs, a validation split: still the sequential results; chunks of one or two clients
    give the same as all at once."""
    cfg = _cfg("fedavg", **{"local.epochs": 2, "data.val_fraction": 0.2})
    b = build(cfg)
    sizes = {len(b.split.train[c]) for c in range(cfg.federation.num_clients)}
    # the clients really differ in their number of batches, and trailing batches are short
    assert len({-(-n // 32) for n in sizes}) > 1 and any(n % 32 for n in sizes)
    seq = _federate(cfg, _sequential)
    _assert_same(seq, _federate(cfg, run_batched))
    _assert_same(seq, _federate(cfg, lambda *a: run_batched(*a, max_clients=2)))
    assert any("val_accuracy" in o.metrics for o in seq[1] if isinstance(o, ClientResult))


def test_fixed_steps_and_static_mask_stays_masked() -> None:
    cfg = _cfg("static_mask", **{"local.steps": 4, "local.batch_size": 16})
    seq, bat = _federate(cfg, _sequential), _federate(cfg, lambda *a: run_batched(*a, max_clients=1, device="cpu"))
    _assert_same(seq, bat)
    state = bat[0]
    for n, m in state.mask.items():
        assert bool((state.params[n][~m] == 0).all())
    assert all(o.metrics["steps"] == 4 for o in bat[1] if isinstance(o, ClientResult))


def test_injected_faults_fail_as_in_the_sequential_loop() -> None:
    cfg = _cfg("fedavg", **{"faults.crash_prob": 0.3, "faults.nan_prob": 0.2})
    # two rounds: this federation's third round amplifies float reassociation past the tolerance
    # (two sequential runs that differ only in local.threads differ far more)
    seq, bat = _federate(cfg, _sequential, rounds=2), _federate(cfg, run_batched, rounds=2)
    assert any(isinstance(o, ClientFailure) for o in seq[1])
    _assert_same(seq, bat)


def test_batch_plan_is_the_local_loop_order() -> None:
    local = _cfg("fedavg", **{"local.batch_size": 4, "local.epochs": 2}).local
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plan = batch_plan(9, local, g1)  # 4 + 4 per epoch, the single trailing sample dropped
    want = [*iter_batches(9, 4, g2), *iter_batches(9, 4, g2)]
    assert len(plan) == len(want) == 4 and all(torch.equal(a, b) for a, b in zip(plan, want))
    steps = _cfg("fedavg", **{"local.batch_size": 4, "local.steps": 5}).local
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    want = [b for _ in range(3) for b in iter_batches(9, 4, g2)][:5]  # steps run across epochs
    assert all(torch.equal(a, b) for a, b in zip(batch_plan(9, steps, g1), want, strict=True))


def test_gradient_clipping_matches() -> None:
    cfg = _cfg("static_mask", **{"local.clip_norm": 0.5})
    _assert_same(_federate(cfg, _sequential), _federate(cfg, run_batched))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A teacher's model.safetensors: the tiny setup's initial model."""
    from safetensors.torch import save_file

    net = build(_cfg("fedavg")).spec.build()
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("student", ["fedavg", "static_mask"])
def test_logit_kd_matches(teacher, student: str) -> None:  # type: ignore[no-untyped-def]
    extra = {"method.student.sparsity": 0.8} if student == "static_mask" else {}
    kd = {"method.kd": "logit", "method.kd_teacher": str(teacher), "method.student.name": student}
    cfg = _cfg("kd", **kd, **extra)
    assert unsupported_reason(build(cfg).method) is None
    _assert_same(_federate(cfg, _sequential), _federate(cfg, run_batched))
    feature = build(_cfg("kd", **{"method.kd": "feature", "method.kd_teacher": str(teacher)})).method
    assert (unsupported_reason(feature) or "").startswith("kd: feature")


def test_a_failing_vectorised_step_fails_its_chunk_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An error in the joint training fails the clients of that chunk (as ClientFailure, their
    hooks closed); the other chunks' clients finish normally."""
    cfg = _cfg("bn_only")
    b = build(cfg)
    m = b.method
    state = m.init_state({k: v.clone() for k, v in b.spec.build().state_dict().items()})
    server = Server(cfg, m, engine=None, x_test=b.data.x_test, y_test=b.data.y_test)  # type: ignore[arg-type]
    tasks = server.make_tasks(state, 1, [0, 1, 2])
    real, calls, closed = batched._vectorised_sgd, [], []
    real_close = ScaledHooks.close  # bn_only's hooks

    def flaky(fns, *args):  # type: ignore[no-untyped-def]
        calls.append(len(fns))
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(fns, *args)

    def close(self):  # type: ignore[no-untyped-def]
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(batched, "_vectorised_sgd", flaky)
    monkeypatch.setattr(ScaledHooks, "close", close)
    src = ClientDataSource(b.data.x_train, b.data.y_train, b.split)
    outs = run_batched(m, src, tasks, [{}, {}, {}], max_clients=2)
    assert calls == [2, 1] and len(closed) == 3
    assert [type(o).__name__ for o in outs] == ["ClientResult", "ClientResult", "ClientFailure"]
    assert "out of memory (simulated) (batched training)" in outs[2].reason  # type: ignore[union-attr]


def test_fallback_runs_the_sequential_loop_for_other_hooks() -> None:
    """A method whose hooks give no functional step (FedSkel's skeleton) trains one by one in
    the batched executor: the sequential numbers, bit for bit."""
    cfg = _cfg("fedskel")
    assert unsupported_reason(build(cfg).method) is not None
    seq, bat = _federate(cfg, _sequential, rounds=2), _federate(cfg, run_batched, rounds=2)
    assert all(torch.equal(seq[0].params[k], bat[0].params[k]) for k in seq[0].params)
    assert [o.payload for o in seq[1]] == [o.payload for o in bat[1]]


@pytest.mark.parametrize("name", ["fedskel", "dynamic"])
def test_unsupported_methods_name_themselves(name: str) -> None:
    over = {"method.density": 0.5} if name == "dynamic" else {}
    reason = unsupported_reason(build(_cfg(name, **over)).method)
    assert reason is not None and reason.startswith(f"{name}:")


def test_static_mask_csr_kernel_and_bf16_are_unsupported() -> None:
    reason = unsupported_reason(build(_cfg("static_mask", **{"method.kernel": "csr"})).method)
    assert reason is not None and reason.startswith("static_mask:") and "kernel" in reason
    reason = unsupported_reason(build(_cfg("fedavg", **{"local.precision": "bf16"})).method)
    assert reason is not None and "bf16" in reason


def test_chunks_bound_the_clients_alive_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``max_clients``, a round runs in waves: only one chunk's models are alive while it
    trains (the round's other clients are not begun yet, or finished and released)."""
    import gc

    cfg = _cfg("fedavg", **{"federation.num_clients": 8, "federation.clients_per_round": 8})
    b = build(cfg)
    m = b.method
    state = m.init_state({k: v.clone() for k, v in b.spec.build().state_dict().items()})
    server = Server(cfg, m, engine=None, x_test=b.data.x_test, y_test=b.data.y_test)  # type: ignore[arg-type]
    tasks = server.make_tasks(state, 1, list(range(8)))
    src = ClientDataSource(b.data.x_train, b.data.y_train, b.split)
    model_type = type(b.spec.build())

    def models() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is model_type)

    before, alive = models(), []
    real = batched._vectorised_sgd

    def counting(fns, *args):  # type: ignore[no-untyped-def]
        alive.append(models() - before)
        return real(fns, *args)

    monkeypatch.setattr(batched, "_vectorised_sgd", counting)
    outs = run_batched(m, src, tasks, [{} for _ in tasks], max_clients=2)
    assert all(isinstance(o, ClientResult) for o in outs)
    assert alive == [2, 2, 2, 2]
