"""FedPM: stochastic binary masks over frozen random weights with Bayesian aggregation.

FedPM (Isik et al., "Sparse Random Networks for Communication-Efficient Federated Learning",
ICLR 2023; reference code BerivanIsik/sparse-random-networks) freezes the weights at their random
initialisation; clients learn a probability ``theta = sigmoid(s)`` per weight, train through a
Bernoulli mask sampled at every forward (straight-through), and upload one Bernoulli sample of
their final mask (one bit per weight); the server treats the bits as observations of a Beta-
Bernoulli model per weight and sends the posterior estimate of ``theta`` back. Here it runs on
HideNseek's frozen initialisation and SynFlow sparsity (the same ``W0`` and mask, through
:class:`~sparsefl.methods.fedmask.FrozenMaskMethod`), so the mask is learned over the kept
weights only. Every choice where the paper is silent is an option, listed in
``docs/methods/fedpm.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsefl.comm import Update
from sparsefl.config import opt
from sparsefl.methods.fedmask import FrozenInitConfig, FrozenMaskMethod, Gate
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS
from sparsefl.rng import torch_gen

Tensor = torch.Tensor


@dataclass(frozen=True)
class FedPMConfig(FrozenInitConfig):
    """Options of FedPM (docs/methods/fedpm.md)."""

    score_mean: float = opt(0.0, "server's initial scores s ~ N(score_mean, score_std^2), theta = sigmoid(s)")
    score_std: float = opt(1.0, "spread of the server's initial scores (0: every theta = sigmoid(score_mean))", ge=0)
    ste: Literal["reference", "identity"] = opt(
        "reference", "backward of the Bernoulli sample: grad * theta (the reference code) or grad"
    )
    score_lr: float = opt(100.0, "learning rate of the scores at round 1 (follows local.lr's schedule)", gt=0)
    prior: float = opt(1.0, "Beta(prior, prior) prior of every kept weight's theta", ge=1)
    reset_prior: bool = opt(True, "restart the posterior from the prior every round (else accumulate rounds)")
    epsilon: float = opt(0.01, "the server reads a received 1 as 1 - epsilon and a 0 as epsilon", gt=0, lt=0.5)
    estimate: Literal["mode", "mean"] = opt("mode", "global theta: the Beta posterior's mode or mean")
    eval_mask: Literal["sample", "threshold"] = opt(
        "sample", "global model: one Bernoulli(theta) mask per evaluation, or 1[theta > 0.5]"
    )


class BernoulliSTE(torch.autograd.Function):
    """A Bernoulli(``theta``) sample forward; straight-through backward.

    ``forward(theta, gen, scaled)``: ``1[u < theta]`` with ``u ~ U(0, 1)`` drawn from ``gen``
    (on the CPU, so the draws are the same on every device); backward ``grad * theta``
    (``scaled``, the reference code's ``Bern``) or ``grad``."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, gen: torch.Generator, scaled: bool) -> Tensor:  # type: ignore[override]
        ctx.scaled = scaled
        if scaled:
            ctx.save_for_backward(theta)
        u = torch.rand(theta.shape, generator=gen, dtype=torch.float32).to(theta.device)
        return (u < theta).to(theta.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if not ctx.scaled:
            return grad, None, None
        (theta,) = ctx.saved_tensors
        return grad * theta, None, None


def sample_mask(theta: Tensor, gen: torch.Generator) -> Tensor:
    """One Bernoulli(``theta``) mask (float32 {0, 1}), uniforms drawn on the CPU from ``gen``."""
    return (torch.rand(theta.shape, generator=gen, dtype=torch.float32) < theta.cpu()).to(theta.device, torch.float32)


def beta_update(alpha: Tensor, beta: Tensor, bits: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor]:
    """The Beta posterior after observing ``bits`` (each a {0, 1} tensor), read softly:

    ``alpha += sum_k (eps + (1 - 2 eps) x_k)``, ``beta += sum_k (1 - eps - (1 - 2 eps) x_k)``,
    i.e. a 1 counts as ``1 - eps`` ones and ``eps`` zeros (the reference code's clamping)."""
    a, b = alpha.clone(), beta.clone()
    for x in bits:
        soft = epsilon + (1 - 2 * epsilon) * x.to(a.dtype)
        a += soft
        b += 1 - soft
    return a, b


def beta_estimate(alpha: Tensor, beta: Tensor, estimate: str) -> Tensor:
    """``theta`` from a Beta(``alpha``, ``beta``) posterior: the mode ``(a - 1) / (a + b - 2)``
    (needs ``a, b >= 1`` and ``a + b > 2``) or the mean ``a / (a + b)``."""
    if estimate == "mode":
        return (alpha - 1) / (alpha + beta - 2)
    return alpha / (alpha + beta)


@METHODS.register(
    "fedpm",
    FedPMConfig,
    summary="FedPM (Isik et al. 2023): stochastic masks, Bayesian aggregation, on HideNseek's frozen init",
)
class FedPM(FrozenMaskMethod):
    """FedPM (Isik et al., ICLR 2023): probabilistic masks over frozen random weights.

    https://openreview.net/forum?id=k1FHgri5y3- . The server holds ``theta`` per kept weight and
    sends it down (float); a client trains ``s = logit(theta)`` through a Bernoulli mask sampled
    at every forward (straight-through), then uploads one sample of ``Bernoulli(sigmoid(s))``,
    one bit per kept weight; the server's Beta posterior per weight gives the new ``theta``.

    Parameters
    ----------
    config:
        A :class:`FedPMConfig` (the frozen-init options are HideNseek's).
    experiment, spec, profile:
        As for every :class:`~sparsefl.methods.Method`.
    """

    config_cls = FedPMConfig
    config: FedPMConfig
    tag = "fedpm"

    # ---------------------------------------------------------------------------------- server
    def _init_extra(self, state: ServerState) -> StateDict:
        """``theta = sigmoid(s0)``, ``s0 ~ N(score_mean, score_std^2)`` on the kept positions (0 elsewhere);
        the Beta posterior at its prior."""
        mask = self._mask(state)
        extra: StateDict = {}
        for k, m in mask.items():
            g = torch_gen(self.experiment.seed, "fedpm", "scores", k)
            s0 = torch.randn(m.shape, generator=g) * self.config.score_std + self.config.score_mean
            extra[f"theta/{k}"] = torch.sigmoid(s0) * m.to(torch.float32)
            extra[f"alpha/{k}"] = torch.full(m.shape, self.config.prior, dtype=torch.float64)
            extra[f"beta/{k}"] = torch.full(m.shape, self.config.prior, dtype=torch.float64)
        return extra

    def _theta(self, state: ServerState) -> StateDict:
        """The global ``theta`` per scope weight (0 on pruned positions)."""
        return {k: state.extra[f"theta/{k}"] for k in self.roles.scope}

    def _down_values(self, state: ServerState) -> StateDict:
        return self._theta(state)

    def _global_mask(self, state: ServerState) -> StateDict:
        """``1[theta > 0.5]``, or one Bernoulli(theta) sample drawn from
        ``(seed, "fedpm", "eval", round)`` (``eval_mask``)."""
        if self.config.eval_mask == "threshold":
            return {k: (t > 0.5).to(torch.float32) for k, t in self._theta(state).items()}
        return {
            k: sample_mask(t, torch_gen(self.experiment.seed, "fedpm", "eval", state.round, k))
            for k, t in self._theta(state).items()
        }

    def _aggregate_masks(self, state: ServerState, received: Sequence[Received]) -> StateDict:
        """Bayesian aggregation: per kept weight, the Beta posterior (from the prior when
        ``reset_prior``) after the round's bits, one vote per client; ``theta`` its mode or
        mean. A weight no client sent keeps its ``theta``."""
        cfg, mask = self.config, self._mask(state)
        extra = dict(state.extra)
        for k, m in mask.items():
            bits = [b for r in received if (b := self._bits_of(state, r, k)) is not None]
            if not bits:
                continue
            a0, b0 = state.extra[f"alpha/{k}"], state.extra[f"beta/{k}"]
            if cfg.reset_prior:
                a0, b0 = torch.full_like(a0, cfg.prior), torch.full_like(b0, cfg.prior)
            a, b = beta_update(a0, b0, bits, cfg.epsilon)
            extra[f"alpha/{k}"], extra[f"beta/{k}"] = a, b
            extra[f"theta/{k}"] = (beta_estimate(a, b, cfg.estimate) * m).to(torch.float32)
        return extra

    # ---------------------------------------------------------------------------------- client
    def _initial_scores(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        """``s = logit(theta)`` of the downloaded ``theta`` (clamped away from 0 and 1)."""
        return {k: torch.logit(client_state[f"down/{k}"], eps=1e-6) for k in self.roles.scope}

    def _gate(self, ctx: LocalContext) -> Gate:
        gen = torch_gen(ctx.seed, "fedpm", "train", ctx.client_id, ctx.round)
        scaled = self.config.ste == "reference"
        return lambda s: BernoulliSTE.apply(torch.sigmoid(s), gen, scaled)

    def _upload_bits(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        """One Bernoulli(sigmoid(s)) sample of the final scores, drawn from
        ``(seed, "fedpm", "upload", client, round)``; kept as ``sample/{name}`` for the client's
        own validation."""
        out = {}
        for k in self.roles.scope:
            gen = torch_gen(ctx.seed, "fedpm", "upload", ctx.client_id, ctx.round, k)
            out[k] = sample_mask(torch.sigmoid(client_state[f"score/{k}"]), gen)
            client_state[f"sample/{k}"] = out[k]
        return out

    def _personal_mask(self, client_state: ClientState) -> StateDict:
        """The uploaded sample (``eval_mask=sample``) or ``1[sigmoid(s) > 0.5]``."""
        if self.config.eval_mask == "sample":
            return {k: client_state[f"sample/{k}"] for k in self.roles.scope if f"sample/{k}" in client_state}
        return {k: (client_state[f"score/{k}"] > 0).to(torch.float32) for k in self.roles.scope}

    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """The base's, without last round's scores and sample (FedPM keeps no personal state)."""
        state = {k: v for k, v in client_state.items() if not k.startswith(("score/", "sample/"))}
        return super().receive(model, down, state, setup)


__all__ = ["BernoulliSTE", "FedPM", "FedPMConfig", "beta_estimate", "beta_update", "sample_mask"]
