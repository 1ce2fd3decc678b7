"""Knowledge distillation (method.name=kd): loss oracles, the KDHooks wrapper (delegation,
local.clip_norm over student + projections), the frozen teacher, composition with other methods'
hooks, config validation, and end-to-end runs on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.config import ModelConfig, load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import run_experiment
from sparsefl.methods.base import LocalHooks
from sparsefl.methods.kd import KD, KDConfig, KDHooks, feature_kd_loss, logit_kd_loss, make_projections
from sparsefl.methods.static_mask import StaticMaskHooks
from sparsefl.models import ModelSpec, build_model
from sparsefl.protocol.messages import LocalContext
from sparsefl.rng import torch_gen
from sparsefl.runtime.client import train_local, train_step
from sparsefl.runtime.sgd import SGD

torch.set_num_threads(1)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = build_model(ModelConfig(), SHAPE, 10, 123)
    p = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
    return p


def make(teacher: Path | None, *overrides: str) -> KD:
    extra = [f"method.kd_teacher={teacher}"] if teacher is not None else []
    exp = load_config(overrides=["method.name=kd", *extra, *overrides])
    net = build_model(exp.model, SHAPE, 10, 0)
    assert isinstance(exp.method, KDConfig)
    return KD(exp.method, exp, ModelSpec(net, SHAPE, 10), profile_model(net, SHAPE))


def data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(m: KD, model: nn.Module, state: dict, n: int = 24) -> LocalHooks:
    x, y = data(n)
    ctx = LocalContext(3, 1, 0.05, 0, m.experiment.local, n)
    hooks = m.hooks(model, state, ctx)
    try:
        train_local(hooks, x, y, m.experiment.local, 0.05, torch_gen(0, "t"), m.profile)
    finally:
        hooks.close()
    return hooks


# ------------------------------------------------------------------------------------------------
# loss oracles
# ------------------------------------------------------------------------------------------------


def test_logit_kd_loss_hand_computed() -> None:
    s, t, temp = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0

    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(a / temp) for a in v]
        return [a / sum(e) for a in e]

    ps, pt = softmax(s), softmax(t)
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    got = logit_kd_loss(torch.tensor([s, s]), torch.tensor([t, t]), temp)
    assert float(got) == pytest.approx(temp**2 * kl, rel=1e-6)  # batchmean over 2 equal rows
    assert float(logit_kd_loss(torch.tensor([s]), torch.tensor([s]), 4.0)) == pytest.approx(0.0, abs=1e-7)


def test_feature_kd_loss_hand_computed() -> None:
    s = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    t = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    # MSE = (1 + 1) / 2 = 1; cosine 0 -> (1 - 0) = 1; total 1 + 0.5 * 1
    assert float(feature_kd_loss([s], [t], beta=0.5)) == pytest.approx(1.5)
    # spatial alignment: a 2x2 student map pooled to the teacher's 1x1 (mean 4) -> 0 loss
    s2 = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 1, 2, 2)
    assert float(feature_kd_loss([s2], [torch.full((1, 1, 1, 1), 4.0)])) == pytest.approx(0.0, abs=1e-7)
    # mean over layers: (1.5 + 0) / 2 with beta 0.5 -> MSE mean 0.5 + 0.5 * cos-term mean 0.5
    two = feature_kd_loss([s, s2], [t, torch.full((1, 1, 1, 1), 4.0)], beta=0.5)
    assert float(two) == pytest.approx(0.5 + 0.5 * 0.5)


# ------------------------------------------------------------------------------------------------
# the wrapper
# ------------------------------------------------------------------------------------------------


def test_local_clip_norm_covers_student_and_projections() -> None:
    """``local.clip_norm`` clips over ``hooks.parameters()``, which for KD holds the projections
    (the study's unclipped-projection bug is the case where they are left out)."""
    student = nn.Linear(2, 2)
    projs = make_projections([2], [3])
    inner = LocalHooks(student, profile_model(student, (2,)))
    hooks = KDHooks(inner, nn.Linear(2, 2), "feature", 0.5, 4.0, feature_layers=[""], projections=projs)
    assert {id(p) for p in hooks.parameters()} == {id(p) for p in [*student.parameters(), *projs.parameters()]}
    params = [*student.parameters(), *projs.parameters()]
    before = [p.detach().clone() for p in params]

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # a large gradient on the projection only (its output does not reach the logits)
        return logits.sum() * 0.01 + 50.0 * projs[0].weight.sum()

    hooks.loss = loss  # type: ignore[method-assign]
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    train_step(hooks, SGD(hooks.parameters(), lr=1.0), x, y, 0, clip_norm=1.0)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert float(moved) == pytest.approx(1.0, rel=1e-4)  # plain SGD at lr 1: the step is the clipped gradient


def test_clipping_comes_after_the_methods_gradient_masking() -> None:
    """The clipped norm is that of the gradient the method applies (masked), not the raw one."""
    net = nn.Linear(4, 1, bias=False)

    class Half(LocalHooks):
        def after_backward(self, step: int) -> None:
            assert net.weight.grad is not None
            net.weight.grad[:, 2:] = 0.0

    hooks = Half(net, profile_model(net, (4,)))
    before = net.weight.detach().clone()
    hooks.loss = lambda logits, y, x: 100.0 * logits.sum()  # type: ignore[method-assign]
    train_step(hooks, SGD(hooks.parameters(), lr=1.0), torch.ones(2, 4), torch.zeros(2), 0, clip_norm=0.5)
    step = net.weight.detach() - before
    assert torch.equal(step[:, 2:], torch.zeros(1, 2))  # masked coordinates never move
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-5)


def test_kd_clip_is_gone_in_favour_of_local_clip_norm() -> None:
    with pytest.raises(ConfigError, match="method.kd_clip"):
        load_config(overrides=["method.name=kd", "method.kd=none", "method.kd_clip=1"])
    assert load_config(overrides=["local.clip_norm=1"]).local.clip_norm == 1.0


def teacher_state(m: KD) -> dict:
    """A client state holding the teacher, as the setup payload delivers it."""
    state = m.init_state(m.spec.build().state_dict())
    setup = m.setup_payload(state)
    assert setup is not None
    return m.receive(m.new_model(), m.broadcast(state), {}, setup)


def test_teacher_never_updated_and_projections_persist(teacher_path: Path) -> None:
    for mode in ("logit", "feature"):
        m = make(teacher_path, f"method.kd={mode}")
        assert m.teacher is not None
        before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
        model = m.new_model()
        state = teacher_state(m)
        received = {k: v.clone() for k, v in state.items()}
        hooks = train(m, model, state)
        assert isinstance(hooks, KDHooks) and hooks.last_kd_loss > 0
        assert not any(p is q for p in hooks.parameters() for q in m.teacher.parameters())
        after = m.teacher.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, BN buffers included
        assert all(torch.equal(received[k], state[k]) for k in received if k.startswith("kd_teacher."))
        if mode == "feature":
            assert m.feature_layers == ["bn1", "bn2"]
            w = state["kd.proj.1.weight"]
            assert w.shape == (64, 64, 1, 1)
            assert torch.equal(m.projections(state, 3)[1].weight, w)  # reloaded next round
            assert not torch.equal(m.projections({}, 3)[1].weight, w)  # trained away from the init


def test_kd_loss_is_the_mix_of_student_loss_and_distillation(teacher_path: Path) -> None:
    m = make(teacher_path, "method.kd_alpha=0.3", "method.kd_temperature=2")
    assert m.teacher is not None
    model = m.new_model()
    x, y = data(8)
    ctx = LocalContext(0, 1, 0.05, 0, m.experiment.local, 8)
    hooks = m.hooks(model, teacher_state(m), ctx)
    logits = hooks.forward(x)
    want = 0.3 * logit_kd_loss(logits, m.teacher(x), 2.0) + 0.7 * F.cross_entropy(logits, y)
    assert float(hooks.loss(logits, y, x).detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_the_divergence_check_skips_a_distillation_loss(teacher_path: Path) -> None:
    # alpha T^2 KL + (1 - alpha) CE is not on the cross-entropy's scale: ln C says nothing of it
    assert not make(teacher_path).loss_is_cross_entropy
    assert not make(teacher_path, "method.kd=feature").loss_is_cross_entropy
    assert make(None, "method.kd=none").loss_is_cross_entropy


def test_composes_with_static_mask(teacher_path: Path) -> None:
    m = make(teacher_path, "method.student.name=static_mask", "method.student.sparsity=0.95")
    assert m.config.sparsity == 0.95
    state = m.init_state(m.spec.build().state_dict())
    model = m.new_model()
    cstate = m.receive(model, m.broadcast(state), {}, m.setup_payload(state))
    hooks = train(m, model, cstate)
    assert isinstance(hooks, KDHooks) and isinstance(hooks.inner, StaticMaskHooks)
    assert state.mask is not None
    for n, keep in state.mask.items():
        assert (model.state_dict()[n][~keep] == 0).all()  # the student's masking still applies


@pytest.mark.parametrize("student", ["zerofl", "fedskel", "fedavg", "dynamic"])
def test_composes_with_other_students(teacher_path: Path, student: str) -> None:
    m = make(teacher_path, f"method.student.name={student}")
    state = m.init_state(m.spec.build().state_dict())
    model = m.new_model()
    cstate = m.receive(model, m.downlink(state, 0) or m.broadcast(state), teacher_state(m))
    hooks = train(m, model, cstate, n=16)
    assert isinstance(hooks, KDHooks)
    assert type(hooks.inner) is type(
        m.student.hooks(model, dict(cstate), LocalContext(0, 1, 0.05, 0, m.experiment.local, 16))
    )


def test_fedskel_student_keeps_its_frozen_rows_frozen(teacher_path: Path) -> None:
    """Every LocalHooks call reaches the student's hooks, update_rows included: FedSkel's frozen
    rows do not move after its skeleton is chosen (SetSkel of one step, then 5 skeleton steps)."""
    m = make(teacher_path, "method.student.name=fedskel", "method.student.setskel_steps=1", "local.steps=6")
    state = m.init_state(m.spec.build().state_dict())
    model = m.new_model()
    cstate = m.receive(model, m.downlink(state, 0) or m.broadcast(state), teacher_state(m))
    x, y = data(32)
    hooks = m.hooks(model, cstate, LocalContext(0, 1, 0.05, 0, m.experiment.local, 32))
    after_setskel: dict[str, torch.Tensor] = {}
    inner_after_step = hooks.inner.after_step

    def after_step(step: int) -> None:
        inner_after_step(step)
        if step == 0:
            after_setskel.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    hooks.inner.after_step = after_step  # type: ignore[method-assign]
    try:
        train_local(hooks, x, y, m.experiment.local, 0.05, torch_gen(0, "t"), m.profile)
    finally:
        hooks.close()
    inner = hooks.inner
    assert inner.skeleton is not None and hooks.update_rows() is inner.update_rows()
    for layer in inner.layers:
        frozen = ~inner.skeleton[layer.name]
        for t in layer.frozen:
            assert torch.equal(model.state_dict()[t][frozen], after_setskel[t][frozen]), t


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method.kd=logit"], "method.kd_teacher"),
        (["method.kd_teacher=/nonexistent/model.safetensors"], "method.kd_teacher"),
        (["method.kd=none", "method.student.name=kd", "method.student.kd=none"], "method.student.name"),
        (["method.kd=none", "method.student.name=static_mask", "method.student.sparsity=2"], "method.student.sparsity"),
        (["method.kd=none", "method.student.name=static_mask", "method.student.bogus=1"], "method.student.bogus"),
        (["method.kd=none", "method.student.name=zerofl", "method.sparsity=0.5"], "method.sparsity"),
        (["method.kd=none", "method.kd_alpha=1.5"], "method.kd_alpha"),
        (
            ["method.kd=feature", "method.kd_teacher=TEACHER", 'method.kd_feature_layers=["nope"]'],
            "method.kd_feature_layers",
        ),
    ],
)
def test_config_errors_name_the_key(teacher_path: Path, overrides: list[str], key: str) -> None:
    overrides = [o.replace("TEACHER", str(teacher_path)) for o in overrides]
    with pytest.raises(ConfigError, match=key):
        make(None, *overrides)


def test_teacher_of_another_architecture_must_match(teacher_path: Path) -> None:
    with pytest.raises(ConfigError, match="method.kd_teacher"):
        make(teacher_path, "method.kd_teacher_model=mlp")


# ------------------------------------------------------------------------------------------------
# end to end on digits
# ------------------------------------------------------------------------------------------------

MUST = ["federation.num_clients=20", "federation.clients_per_round=10", "data.alpha=0.5"]
STUDENT = ["method.student.name=static_mask", "method.student.sparsity=0.95"]


def test_e2e_kd_none_is_the_student_bit_for_bit_and_logit_runs(tmp_path: Path) -> None:
    """Under one clipping rule (``local.clip_norm``, shared by both arms), ``kd=none`` is the
    plain student bit for bit."""
    base = [*MUST, "federation.rounds=2", "local.clip_norm=1"]
    sm = run_experiment(
        load_config(overrides=[*base, "method.name=static_mask", "method.sparsity=0.95"]), tmp_path / "s"
    )
    none = run_experiment(load_config(overrides=[*base, "method.name=kd", "method.kd=none", *STUDENT]), tmp_path / "n")
    assert none["model_sha256"] == sm["model_sha256"]
    assert none["uplink_bytes_total"] == sm["uplink_bytes_total"]
    teacher = tmp_path / "s" / "model.safetensors"  # any model of the architecture will do here
    kd = run_experiment(
        load_config(overrides=[*base, "method.name=kd", f"method.kd_teacher={teacher}", *STUDENT]), tmp_path / "k"
    )
    assert kd["model_sha256"] != sm["model_sha256"] and kd["density"] == pytest.approx(sm["density"])
    # the teacher travels once per client in the setup payload, and is counted there
    rows = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    clients = {c["id"] for r in rows for c in r["clients"]}
    extra = kd["downlink_bytes_total"] - sm["downlink_bytes_total"]
    one = KD.teacher_bytes(make(teacher, "method.kd=logit"))
    assert len(clients) * one <= extra <= len(clients) * one * 1.05


@pytest.mark.slow
def test_e2e_kd_static_mask_95_at_least_as_accurate(tmp_path: Path) -> None:
    """The must-show setting: 30 rounds; a dense FedAvg teacher of the same config, then the 95%
    static-mask student with and without logit KD (same seeds, the same clipping rule: the
    default ``local.clip_norm=0`` in every arm)."""
    full = [*MUST, "federation.rounds=30"]
    run_experiment(load_config(overrides=full), tmp_path / "teacher")
    t = tmp_path / "teacher" / "model.safetensors"
    plain = run_experiment(
        load_config(overrides=[*full, "method.name=static_mask", "method.sparsity=0.95"]), tmp_path / "s"
    )
    kd = run_experiment(
        load_config(overrides=[*full, "method.name=kd", f"method.kd_teacher={t}", *STUDENT]), tmp_path / "k"
    )
    assert kd["final_accuracy"] >= plain["final_accuracy"], (kd["final_accuracy"], plain["final_accuracy"])


# ------------------------------------------------------------------------------------------------
# the kd suite and cross-architecture teachers
# ------------------------------------------------------------------------------------------------


def test_kd_suite_pairs_every_kd_arm_with_its_student_without_kd_under_one_clipping() -> None:
    from sparsefl.experiment.bench import load_suite

    plan = load_suite("kd").plan()
    assert {r.cfg.local.clip_norm for r in plan} == {1.0}  # one clipping rule for every arm
    plain = {r.cfg.model.name for r in plan if r.cfg.method.name == "fedavg"}
    kd = [r for r in plan if r.cfg.method.name == "kd"]
    pairs = {(r.cfg.method.kd_teacher_model, r.cfg.model.name, r.cfg.method.kd) for r in kd}  # type: ignore[attr-defined]
    assert pairs == {
        (t, s, mode)
        for t, s in (("resnet50", "resnet18"), ("resnet34", "resnet18"), ("resnet50", "resnet34"))
        for mode in ("logit", "feature")
    }
    assert {r.cfg.model.name for r in kd} <= plain
    assert {r.cfg.seed for r in plan} == {0, 1, 2} and "resnet18_imagenet" in plain


def test_feature_kd_from_a_bottleneck_teacher_projects_to_its_widths(tmp_path: Path) -> None:
    teacher = build_model(ModelConfig(name="resnet50", width=0.125), SHAPE, 10, 7)
    p = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(p))
    over = ["model.name=resnet18", "model.width=0.125", "method.kd=feature", "method.kd_teacher_model=resnet50"]
    exp = load_config(overrides=["method.name=kd", f"method.kd_teacher={p}", *over, "method.kd_teacher_width=0.125"])
    net = build_model(exp.model, SHAPE, 10, 0)
    m = KD(exp.method, exp, ModelSpec(net, SHAPE, 10), profile_model(net, SHAPE))
    assert m.feature_layers == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert m._widths == ([8, 16, 32, 64], [32, 64, 128, 256])
    state = teacher_state(m)
    hooks = train(m, m.new_model(), state, n=8)
    assert isinstance(hooks, KDHooks) and hooks.last_kd_loss > 0
    assert state["kd.proj.3.weight"].shape == (256, 64, 1, 1)


def test_kd_hooks_forward_every_local_hook() -> None:
    """A LocalHooks method KDHooks left to the base default would silently drop the student's
    behaviour (e.g. FedSkel's row-compact gradients)."""
    hooks = {n for n, v in vars(LocalHooks).items() if callable(v) and not n.startswith("_")}
    assert hooks - set(vars(KDHooks)) == set()
