"""Knowledge distillation from a dense teacher into a sparse student of any registered method.

``method.name=kd`` wraps a student method (``method.student.name`` and its options under
``method.student.*``) with :class:`~sparsefl.methods.base.Wrapper`: every hook is the
student's, except that the teacher travels once per client in the setup payload and the
student's training hooks gain the distillation loss (:class:`KDHooks`: logit KD after Hinton,
Vinyals & Dean 2015, or feature KD with 1x1 projections). The projections are optimised with
the student, so the local loop's gradient clipping (``local.clip_norm``, shared by every method
so that KD and its no-KD baseline train under one rule) covers both. Options and choices:
``docs/methods/kd.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update, encode_update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.methods.base import Functional, LocalHooks, Method, Wrapper
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import ClientState, LocalContext, ServerState
from sparsefl.registry import METHODS, MODELS
from sparsefl.rng import seeded_torch

Tensor = torch.Tensor
KDMode = Literal["logit", "feature", "none"]

# Client-state key prefix of the feature projections: + "<layer index>.weight".
_PROJ = "kd.proj."
_TEACHER = "kd_teacher."  # + the teacher's state_dict names: its copy in the setup payload and client state


# --------------------------------------------------------------------------------------------------
# Losses (pure functions)
# --------------------------------------------------------------------------------------------------


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (Hinton et al. 2015)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def _align(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool two (N, C, H, W) maps to the smaller spatial size."""
    if s.dim() != 4:
        return s, t
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    return F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)


def feature_kd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], beta: float = 0.5) -> Tensor:
    """``mean_l MSE(F_s, F_t) + beta * mean_l (1 - cos(GAP F_s, GAP F_t))`` on (projected)
    student features and teacher features of equal channel counts; spatial sizes aligned by
    adaptive average pooling; the cosine is per sample, averaged over the batch."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError("feature_kd_loss: need the same non-zero number of student and teacher features")
    mse, cos = [], []
    for s, t in zip(student_feats, teacher_feats):
        s, t = _align(s.float(), t.float())
        mse.append(F.mse_loss(s, t))
        gs = s.mean(dim=(2, 3)) if s.dim() == 4 else s.flatten(1)
        gt = t.mean(dim=(2, 3)) if t.dim() == 4 else t.flatten(1)
        cos.append((1 - F.cosine_similarity(gs, gt, dim=1)).mean())
    return torch.stack(mse).mean() + beta * torch.stack(cos).mean()


def default_feature_layers(model: nn.Module) -> list[str]:
    """The stages ``layers.<i>`` of a ResNet-style model (a ``layers`` Sequential of
    Sequentials), else every ``BatchNorm2d`` (its output: the pre-activation features)."""
    layers = dict(model.named_children()).get("layers")
    if isinstance(layers, nn.Sequential) and all(isinstance(c, nn.Sequential) for c in layers):
        return [f"layers.{i}" for i in range(len(layers))]
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def feature_widths(model: nn.Module, names: Sequence[str], input_shape: tuple[int, ...]) -> list[int]:
    """Channel count (dim 1) of each named module's output on one zero sample (eval pass)."""
    mods = dict(model.named_modules())
    out: dict[str, int] = {}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o.shape[1])) for n in names]
    was = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [out[n] for n in names]


class _Capture:
    """Temporary forward hooks that keep the outputs of named modules (removed by ``close``)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.names = list(names)
        self.out: dict[str, Tensor] = {}
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            self.out[name] = out

        return hook

    def features(self) -> list[Tensor]:
        return [self.out[n] for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def make_projections(student_widths: Sequence[int], teacher_widths: Sequence[int]) -> nn.ModuleList:
    """1x1 convolutions (no bias, Xavier-uniform) from each student width to the teacher's."""
    projs = nn.ModuleList()
    for cs, ct in zip(student_widths, teacher_widths):
        p = nn.Conv2d(cs, ct, 1, bias=False)
        nn.init.xavier_uniform_(p.weight)
        projs.append(p)
    return projs


# --------------------------------------------------------------------------------------------------
# The hooks wrapper
# --------------------------------------------------------------------------------------------------


class KDHooks(LocalHooks):
    """Wraps any method's :class:`LocalHooks`: everything is delegated, the loss gains the
    distillation term, and the optimiser (and so ``local.clip_norm``'s clipping) gains the
    projections.

    Parameters
    ----------
    inner:
        The student method's hooks.
    teacher:
        The frozen teacher (never updated; run in eval mode under ``no_grad``).
    mode, alpha, temperature, beta:
        See docs/methods/kd.md.
    feature_layers:
        Module names whose outputs are distilled (``mode="feature"``), in both models.
    projections:
        One 1x1 projection per feature layer (``mode="feature"``), optimised with the student.
    state:
        The client's state: after every step the projections' weights are written to it (keys
        ``kd.proj.<i>.weight``), so they persist to the client's next round.
    """

    def __init__(
        self,
        inner: LocalHooks,
        teacher: nn.Module,
        mode: KDMode,
        alpha: float,
        temperature: float,
        beta: float = 0.5,
        feature_layers: Sequence[str] = (),
        projections: nn.ModuleList | None = None,
        state: ClientState | None = None,
    ) -> None:
        super().__init__(inner.model, inner.profile)
        self.inner = inner
        self.teacher = teacher
        self.mode = mode
        self.alpha = alpha
        self.temperature = temperature
        self.beta = beta
        self.projections = projections if projections is not None else nn.ModuleList()
        self.feature_layers = list(feature_layers)
        self._student_feats = _Capture(inner.model, self.feature_layers) if mode == "feature" else None
        if mode == "feature" and len(self.projections) != len(self.feature_layers):
            raise ValueError("KDHooks: one projection per feature layer is needed")
        self._state = state
        self.last_kd_loss: float = 0.0

    def parameters(self) -> list[nn.Parameter]:
        """The student's optimised parameters, then the projections'."""
        return [*self.inner.parameters(), *self.projections.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        return self.inner.forward(x)

    @torch.no_grad()
    def teacher_outputs(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits (and features in feature mode) for ``x``."""
        self.teacher.eval()
        if self.mode != "feature":
            return self.teacher(x), []
        cap = _Capture(self.teacher, self.feature_layers)
        try:
            logits = self.teacher(x)
            return logits, cap.features()
        finally:
            cap.close()

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """``alpha * L_kd + (1 - alpha) * L_student`` (just ``L_student`` with ``mode=none``)."""
        hard = self.inner.loss(logits, y, x)
        if self.mode == "none":
            return hard
        t_logits, t_feats = self.teacher_outputs(x)
        if self.mode == "logit":
            soft = logit_kd_loss(logits, t_logits, self.temperature)
        else:
            assert self._student_feats is not None
            s_feats = [p(f) for p, f in zip(self.projections, self._student_feats.features())]
            soft = feature_kd_loss(s_feats, t_feats, self.beta)
        self.last_kd_loss = float(soft.detach())
        return self.alpha * soft + (1 - self.alpha) * hard

    def after_backward(self, step: int) -> None:
        self.inner.after_backward(step)

    def after_step(self, step: int) -> None:
        self.inner.after_step(step)
        if self._state is not None:
            for i, p in enumerate(self.projections):
                self._state[f"{_PROJ}{i}.weight"] = p.weight.detach().clone()

    def update_rows(self) -> Mapping[Tensor, Tensor]:
        return self.inner.update_rows()

    def row_grads(self) -> Mapping[Tensor, Tensor]:
        return self.inner.row_grads()

    def densities(self) -> Mapping[str, LayerDensity]:
        return self.inner.densities()

    def functional(self) -> Functional | None:
        """Logit KD on the student's :class:`Functional`: its loss gains the distillation term
        (the teacher, the method's and so every client's, runs in eval mode without gradients);
        None for feature KD, whose loss reads the student's intermediate features."""
        inner = self.inner.functional()
        if inner is None or self.mode == "none":
            return inner
        if self.mode != "logit":
            return None
        teacher, hard, alpha, temperature = self.teacher, inner.loss, self.alpha, self.temperature
        teacher.eval()

        def loss(logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
            if next(teacher.parameters()).device != x.device:
                teacher.to(x.device)  # the batched executor may train elsewhere than the client's model
            with torch.no_grad():
                t_logits = teacher(x)
            soft = logit_kd_loss(logits, t_logits, temperature)
            return alpha * soft + (1 - alpha) * hard(logits, y, x)

        return replace(inner, loss=loss, key=("kd", inner.key))

    def close(self) -> None:
        if self._student_feats is not None:
            self._student_feats.close()
        self.inner.close()


# --------------------------------------------------------------------------------------------------
# Config and method
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDConfig(MethodConfig):
    """Options of KD composed with a student method (docs/methods)."""

    student: MethodConfig = field(
        default_factory=MethodConfig,
        metadata={"help": "the student method: method.student.name and that method's own options"},
    )
    kd: KDMode = opt("logit", "distillation: logit (Hinton KL), feature (projected MSE + cosine), none")
    kd_teacher: str | None = opt(None, "path of the dense teacher's model.safetensors (required unless kd=none)")
    kd_teacher_model: str | None = opt(
        None, "registered model name of the teacher (default: the student's)", registry=MODELS
    )
    kd_teacher_width: float = opt(1.0, "width multiplier of kd_teacher_model", gt=0)
    kd_temperature: float = opt(4.0, "softmax temperature T of the logit loss", gt=0)
    kd_alpha: float = opt(0.5, "weight of the distillation term (1 - alpha on the student's loss)", ge=0, le=1)
    kd_beta: float = opt(0.5, "feature KD: weight of the (1 - cosine) term", ge=0)
    kd_feature_layers: tuple[str, ...] = opt((), "feature KD: module names distilled (default: ResNet stages / BNs)")

    def __post_init__(self) -> None:
        if self.student.name == "kd":
            raise ConfigError("method.student.name", "kd", "a method other than kd (one of the registered methods)")
        if self.kd != "none" and not self.kd_teacher:
            raise ConfigError(
                "method.kd_teacher", self.kd_teacher, f"a teacher model.safetensors path with kd={self.kd}"
            )
        if self.sparsity == 0:
            object.__setattr__(self, "sparsity", self.student.sparsity)
        elif self.sparsity != self.student.sparsity:
            raise ConfigError(
                "method.sparsity",
                self.sparsity,
                f"unset or the student's (method.student.sparsity={self.student.sparsity})",
            )


@METHODS.register("kd", KDConfig, summary="Knowledge distillation from a dense teacher into any method's student")
class KD(Wrapper):
    """KD wrapped around a student method: the teacher travels in the setup payload, and the
    student's training hooks gain the distillation loss; every other hook is the student's."""

    config_cls = KDConfig
    config: KDConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        try:
            student = METHODS.get(config.student.name)(config.student, experiment, spec, profile)
        except ConfigError as e:  # the student's keys live under method.student.*
            if not e.key.startswith("method."):
                raise
            raise ConfigError("method.student." + e.key.removeprefix("method."), e.value, e.allowed) from None
        super().__init__(config, experiment, spec, profile, student)
        self.teacher: nn.Module | None = None
        self.feature_layers: list[str] = []
        self._widths: tuple[list[int], list[int]] = ([], [])
        if config.kd != "none":
            self.teacher = self._load_teacher()
        if config.kd == "feature":
            assert self.teacher is not None
            names = list(config.kd_feature_layers) or default_feature_layers(spec.template)
            for model, who in ((spec.template, "student"), (self.teacher, "teacher")):
                missing = [n for n in names if n not in dict(model.named_modules())]
                if missing:
                    raise ConfigError("method.kd_feature_layers", missing[0], f"a module name of the {who} model")
            if not names:
                raise ConfigError("method.kd_feature_layers", (), "module names (the model has no BatchNorm2d)")
            self.feature_layers = names
            self._widths = (
                feature_widths(spec.build(), names, spec.input_shape),
                feature_widths(self.teacher, names, spec.input_shape),
            )

    @property
    def student(self) -> Method:
        """The student method (the wrapped one)."""
        return self.inner

    def _load_teacher(self) -> nn.Module:
        from safetensors.torch import load_file

        cfg = self.config
        path = Path(str(cfg.kd_teacher))
        if not path.is_file():
            raise ConfigError("method.kd_teacher", cfg.kd_teacher, "an existing model.safetensors file")
        if cfg.kd_teacher_model is None:
            teacher = self.spec.build()
        else:
            build = MODELS.get(cfg.kd_teacher_model)
            with seeded_torch(self.experiment.seed, "kd", "teacher"):
                teacher = build(self.spec.input_shape, self.spec.num_classes, width=cfg.kd_teacher_width)
        params = load_file(str(path))
        own = teacher.state_dict()
        params = {k: v for k, v in params.items() if k in own}  # e.g. a dynamic run's gates.* are dropped
        try:
            teacher.load_state_dict(params, strict=True)
        except RuntimeError as e:
            raise ConfigError(
                "method.kd_teacher", cfg.kd_teacher, f"weights of the teacher architecture ({e})"
            ) from None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def teacher_bytes(self) -> int:
        """Bytes of the teacher's encoding with ``comm.down`` (it travels in the setup payload,
        once per client, and is counted there)."""
        if self.teacher is None:
            return 0
        return len(encode_update(Update(values=dict(self.teacher.state_dict())), self.experiment.comm.down))

    def _teacher_from(self, client_state: ClientState) -> nn.Module:
        """The client's copy of the teacher, rebuilt from the tensors it received at setup."""
        assert self.teacher is not None
        names = list(self.teacher.state_dict())
        missing = [n for n in names if _TEACHER + n not in client_state]
        if missing:
            raise ValueError(f"kd: this client has not received the teacher (missing {_TEACHER + missing[0]})")
        # on the device of the tensors it received (the client's model's)
        teacher = copy.deepcopy(self.teacher).to(client_state[_TEACHER + names[0]].device)
        teacher.load_state_dict({n: client_state[_TEACHER + n] for n in names}, strict=True)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    # ---------------------------------------------------------------------------- what KD changes
    def setup_payload(self, state: ServerState) -> Update | None:
        """The student's setup plus the teacher (``kd_teacher.*``), sent once per client."""
        own = self.student.setup_payload(state)
        if self.teacher is None:
            return own
        values = {_TEACHER + k: v for k, v in self.teacher.state_dict().items()}
        if own is None:
            return Update(values=values)
        return Update(values={**own.values, **values}, sent=dict(own.sent))

    def setup_spec(
        self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = dict(self.student.setup_spec(spec))
        if self.teacher is not None:
            out.update({_TEACHER + k: (tuple(v.shape), v.dtype) for k, v in self.teacher.state_dict().items()})
        return out

    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Keep the teacher's tensors of the setup payload; the rest is the student's."""
        if setup is not None:
            client_state = {**client_state, **{k: v for k, v in setup.values.items() if k.startswith(_TEACHER)}}
            own = Update(
                values={k: v for k, v in setup.values.items() if not k.startswith(_TEACHER)},
                sent={k: v for k, v in setup.sent.items() if not k.startswith(_TEACHER)},
            )
            setup = own if own.values else None
        return self.student.receive(model, down, client_state, setup)

    def projections(
        self, client_state: ClientState, client_id: int, device: torch.device | None = None
    ) -> nn.ModuleList:
        """The client's feature projections on ``device`` (default: the CPU): from its state, or
        fresh (seeded, drawn on the CPU) the first time."""
        with seeded_torch(self.experiment.seed, "kd", "proj", client_id):
            projs = make_projections(*self._widths)
        if device is not None:
            projs.to(device)
        if all(f"{_PROJ}{i}.weight" in client_state for i in range(len(projs))):
            with torch.no_grad():
                for i, p in enumerate(projs):
                    p.weight.copy_(client_state[f"{_PROJ}{i}.weight"])
        return projs

    @property
    def loss_is_cross_entropy(self) -> bool:
        """Not with distillation: the reported loss mixes in the KD term, whose scale is its own."""
        return self.config.kd == "none" and self.student.loss_is_cross_entropy

    @property
    def why_not_batched(self) -> str | None:
        """Batched with logit KD (or none) around a student that runs batched."""
        if self.config.kd == "feature":
            return "kd: feature distillation reads the student's intermediate features (not captured batched)"
        inner = self.student.why_not_batched
        return None if inner is None else f"kd: its student cannot run batched ({inner})"

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """The student's hooks wrapped in :class:`KDHooks`; left alone when the student trains
        nothing, or nothing of the model itself (e.g. HideNseek's scores)."""
        inner = self.student.hooks(model, client_state, ctx)
        own = {id(p) for p in model.parameters()}
        if inner is None or self.teacher is None or not any(id(p) in own for p in inner.parameters()):
            return inner
        cfg = self.config
        device = next(model.parameters()).device
        projs = self.projections(client_state, ctx.client_id, device) if cfg.kd == "feature" else None
        return KDHooks(
            inner, self._teacher_from(client_state), cfg.kd, cfg.kd_alpha, cfg.kd_temperature, cfg.kd_beta,
            self.feature_layers, projs, client_state,
        )  # fmt: skip

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """The student's upload; the trained projections stay in the client's state."""
        kept = {k: v for k, v in client_state.items() if k.startswith((_PROJ, _TEACHER))}
        update, state = self.student.upload(model, down, client_state, ctx)
        return update, {**state, **kept}
