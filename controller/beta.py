"""ATESD's Beta exposure controller (paper sections 4.2-4.3): a small REINFORCE policy over alpha in [0, 1].

State (6 features, computed when a decision is sampled):
    [progress, recent exposure, EMA loss, EMA mismatch, EMA probe NLL, batch confidence]
progress and recent exposure (the previous decision's alpha) are in [0, 1] and mapped to 2x - 1; the other
four are normalised online (Welford mean/variance per feature, clamped to +-5). A feature not yet seen
(e.g. probe NLL before the first probe) is 0. "Batch confidence" is the mean student max-probability over
the last completed hold window.

Policy: a, b = 1 + softplus(MLP(state)) (+1e-4) with MLP = Linear(6, hidden) -> tanh -> Linear(hidden, 2), so
a, b > 1 and the Beta is unimodal. The last layer starts at zero weight and bias softplus^-1(1): the first
decisions come from Beta(2, 2).

Timing (sized for OPSD/ATESD's ~100-step runs): one alpha per hold window of K = `hold` steps; decision d
(first step t0) is scored when step t0 + L (L = `lookahead` > K) has been observed, by
`controller.reward.decision_reward`, whose reward is already centred and scaled by running statistics of
earlier decisions (the baseline). Every `update_batch` scored decisions give one REINFORCE step:

    policy_loss = -mean_j r_j log Beta(alpha_j; a(s_j), b(s_j)) - entropy_coef * mean_j min(H_j, entropy_cap)

With the defaults (K=4, L=8, update_batch=1) a 100-step run makes 25 decisions and ~22 policy steps (the
first two scored decisions only seed the baseline), instead of the 2 that batches of 8 normalised decisions
allowed. `finish()` scores the decisions still in flight on the steps they got and uses them.

The capped entropy bonus keeps the policy from collapsing below `entropy_cap` nats but gives nothing for
being more diffuse than that, so it never pushes toward over-exploration. log-probs are recomputed with the
current weights (plain REINFORCE, no importance ratio: a decision is at most L/K + 1 updates old).
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atesd.controller.base import REQUIRED_KEYS, ExposurePolicy, check_stats
from atesd.controller.baselines import _as_rng_state
from atesd.controller.reward import RunningStats, accuracy_progress, decision_reward

N_FEATURES = 6
HISTORY = 256
_EPS = 1e-6
_MIN_EXTRA = 1e-4  # a, b >= 1 + 1e-4 > 1 even where softplus underflows

# Every setting, its default and why; docs/controller.md renders the same table.
DEFAULTS: dict[str, Any] = {
    "hold": 4,  # K: 25 decisions in a 100-step run; K-1 = 3 clean same-alpha loss deltas per window
    "lookahead": 8,  # L: the held window and the next one; long enough for delayed gains, short enough to
    # score all but the last decision inside 100 steps
    "gamma": 0.9,  # discount over the lookahead: the end of L=8 still weighs 0.48
    "lambda_gt": 0.1,  # credit weight, in standard deviations of C per standard deviation of P
    "clip": 3.0,  # |standardised progress| bound: an outlier guard, not a shaping device
    "lr": 0.3,  # ~22 noisy steps must be able to move the Beta mean by ~0.2-0.3 (docs/controller.md)
    "update_batch": 1,  # scored decisions per REINFORCE step: one, the running baseline centres them
    "entropy_coef": 0.01,  # capped entropy bonus weight
    "entropy_cap": -1.0,  # nats: no bonus above it (Beta(2,2) has -0.13); only guards against collapse
    "hidden": 32,  # MLP width (6 -> hidden -> 2, tanh)
    "ema": 0.9,  # decay of the loss / mismatch / probe-NLL EMAs of the state
    "reward_ema": 0.9,  # decay of the running mean / sd of P and C (the baseline): memory ~10 decisions
    "grad_clip": 1.0,  # max grad norm of one policy step
    "signal": "loss",  # what P measures: "loss", the paper's relative KD-loss decrease (every step), or
    # "accuracy", the rise of the verified accuracy on a fixed probe set, measured at every decision's first step
    "optimizer": "sgd",  # plain SGD: a step scales with the advantage; Adam's first ~20 steps are close to
    # sign updates, which weigh a barely-above-baseline decision like a clearly good one
}


class BetaExposureController(ExposurePolicy):
    """Adaptive exposure (ATESD). Defaults (DEFAULTS above, docs/controller.md) suit runs of ~100 student
    steps; longer runs may raise `hold`/`lookahead` or lower `lr`.

    Args:
        hold: K, steps one alpha is held.
        lookahead: L > K, steps after a decision's first step that its reward looks at.
        gamma: discount of the learning-progress mean.
        lambda_gt: weight of the teacher-grounded credit term (0: credit not needed, not computed).
        clip: the standardised progress term is clipped to [-clip, clip] (standard deviations).
        lr: learning rate of the policy's optimizer.
        update_batch: scored decisions per REINFORCE step (>= 1; rewards are centred by the running baseline).
        entropy_coef, entropy_cap: capped entropy bonus (see module docstring).
        hidden: MLP width.
        ema: decay of the loss / mismatch / probe-NLL EMAs.
        reward_ema: decay of the running mean / sd that standardise progress and credit.
        grad_clip: max grad norm of a policy step.
        optimizer: 'sgd' (default) or 'adam'.
        signal: 'loss' (the paper's progress of the KD loss) or 'accuracy' (progress of the probe accuracy the
            engine measures when :meth:`wants` asks, at each decision's first step: ``accuracy_progress``).
        one_step: ablation, progress horizon H = 1 instead of L (same timing, same everything else).
        seed: seeds the MLP init and the sampling RNG (random.Random, separate from torch's global RNG).
    """

    def __init__(
        self,
        hold: int = DEFAULTS["hold"],
        lookahead: int = DEFAULTS["lookahead"],
        gamma: float = DEFAULTS["gamma"],
        lambda_gt: float = DEFAULTS["lambda_gt"],
        clip: float = DEFAULTS["clip"],
        lr: float = DEFAULTS["lr"],
        update_batch: int = DEFAULTS["update_batch"],
        entropy_coef: float = DEFAULTS["entropy_coef"],
        entropy_cap: float = DEFAULTS["entropy_cap"],
        hidden: int = DEFAULTS["hidden"],
        ema: float = DEFAULTS["ema"],
        reward_ema: float = DEFAULTS["reward_ema"],
        grad_clip: float = DEFAULTS["grad_clip"],
        optimizer: str = DEFAULTS["optimizer"],
        signal: str = DEFAULTS["signal"],
        one_step: bool = False,
        seed: int = 0,
    ) -> None:
        if hold < 2:
            raise ValueError(f"hold (K) must be >= 2 (progress is measured inside a window), got {hold}")
        if lookahead <= hold:
            raise ValueError(f"lookahead (L) must be > hold (K), got L={lookahead}, K={hold}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if clip <= 0 or lr <= 0 or hidden < 1 or grad_clip <= 0:
            raise ValueError(f"need clip, lr, grad_clip > 0, hidden >= 1; got {clip}, {lr}, {grad_clip}, "
                             f"{hidden}")
        if lambda_gt < 0 or entropy_coef < 0:
            raise ValueError(f"lambda_gt and entropy_coef must be >= 0, got {lambda_gt}, {entropy_coef}")
        if update_batch < 1:
            raise ValueError(f"update_batch must be >= 1, got {update_batch}")
        if signal not in ("loss", "accuracy"):
            raise ValueError(f"signal must be 'loss' or 'accuracy', got {signal!r}")
        if not (0.0 <= ema < 1.0 and 0.0 <= reward_ema < 1.0):
            raise ValueError(f"ema and reward_ema must be in [0, 1), got {ema}, {reward_ema}")
        self.config = dict(
            hold=int(hold), lookahead=int(lookahead), gamma=float(gamma), lambda_gt=float(lambda_gt),
            clip=float(clip), lr=float(lr), update_batch=int(update_batch),
            entropy_coef=float(entropy_coef), entropy_cap=float(entropy_cap), hidden=int(hidden),
            ema=float(ema), reward_ema=float(reward_ema), grad_clip=float(grad_clip), optimizer=str(optimizer),
            signal=str(signal), one_step=bool(one_step),
        )
        self.K, self.L = int(hold), int(lookahead)

        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(N_FEATURES)
            nn.init.uniform_(self.net[0].weight, -bound, bound, generator=g)
            nn.init.uniform_(self.net[0].bias, -bound, bound, generator=g)
            self.net[2].weight.zero_()
            self.net[2].bias.fill_(math.log(math.e - 1.0))  # softplus^-1(1): Beta(2, 2) at start
        if optimizer == "adam":
            self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        elif optimizer == "sgd":
            self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self._rng = random.Random(seed)

        self._step = 0  # student steps observed
        self._in_window = 0
        self._cur: dict[str, Any] | None = None  # the decision in force (also in _pending)
        self._last_alpha: float | None = None
        self._ema: dict[str, float | None] = {"loss": None, "mismatch": None, "probe_nll": None}
        self._progress = 0.0
        self._conf_window: list[float] = []
        self._conf: float | None = None
        self._norm = {"n": [0] * 4, "mean": [0.0] * 4, "m2": [0.0] * 4}
        self._pending: list[dict[str, Any]] = []  # sampled, lookahead not complete
        self._ready: list[dict[str, Any]] = []  # scored with an advantage, waiting for a policy step
        self._counts = {"decisions": 0, "scored": 0, "dropped": 0, "updates": 0}
        self._pstats = RunningStats(reward_ema)  # running mean / sd of P: the progress baseline
        self._cstats = RunningStats(reward_ema)  # and of C
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY)  # last scored decisions, for logs/tests
        self._last: dict[str, float] = {}

    @property
    def uses_credit(self) -> bool:
        return self.config["lambda_gt"] > 0

    # ---- policy -------------------------------------------------------------------------------------
    def beta_params(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """state [..., 6] float32 -> (a, b), each [...] and > 1."""
        ab = 1.0 + _MIN_EXTRA + F.softplus(self.net(state))  # softplus underflows to 0 in fp32
        return ab[..., 0], ab[..., 1]

    def _features(self) -> list[float]:
        raw = [self._ema["loss"], self._ema["mismatch"], self._ema["probe_nll"], self._conf]
        nrm = self._norm
        recent = 0.5 if self._last_alpha is None else self._last_alpha
        out = [2.0 * self._progress - 1.0, 2.0 * recent - 1.0]
        for j, x in enumerate(raw):
            if x is None:
                out.append(0.0)
                continue
            nrm["n"][j] += 1
            d = x - nrm["mean"][j]
            nrm["mean"][j] += d / nrm["n"][j]
            nrm["m2"][j] += d * (x - nrm["mean"][j])
            var = nrm["m2"][j] / nrm["n"][j]
            out.append(max(-5.0, min(5.0, (x - nrm["mean"][j]) / math.sqrt(var + 1e-8))) if var > 0 else 0.0)
        return out

    def _decide(self) -> dict[str, Any]:
        s = self._features()
        with torch.no_grad():
            a, b = self.beta_params(torch.tensor(s, dtype=torch.float32))
        a, b = float(a), float(b)
        alpha = self._rng.betavariate(a, b)
        d = {"t0": self._step, "alpha": alpha, "state": s, "a": a, "b": b, "scale": self._ema["loss"],
             "losses": [], "starts": [], "credits": [], "points": [], "valid": True}
        self._pending.append(d)
        self._in_window = 0
        self._counts["decisions"] += 1
        self._last.update(alpha=alpha, beta_a=a, beta_b=b, beta_mean=a / (a + b), beta_concentration=a + b)
        return d

    def exposure(self) -> float:
        if self._cur is None:
            self._cur = self._decide()
        return self._cur["alpha"]

    def wants(self, key: str) -> bool:
        starts = self._cur is None or self._in_window == 0  # the next observed step is a decision's first
        return key == "probe_accuracy" and self.config["signal"] == "accuracy" and starts

    # ---- bookkeeping --------------------------------------------------------------------------------
    def observe(self, stats: Mapping[str, float]) -> None:
        """Record one student step. Missing keys / non-numbers raise ValueError (nothing is changed); so
        does a missing credit when lambda_gt > 0. Non-finite values are skipped with a warning: they never
        enter the EMAs, the normaliser or a reward; a decision whose lookahead holds a non-finite loss (or
        whose hold window a non-finite credit, when credit is used) is dropped, not scored."""
        keys = (*REQUIRED_KEYS, "credit") if self.uses_credit else REQUIRED_KEYS
        st = check_stats(stats, keys=keys)
        self.exposure()  # the step ran under the decision in force
        bad = sorted(k for k in (*keys, "probe_nll", "probe_accuracy") if k in st and not math.isfinite(st[k]))
        if bad:
            warnings.warn(f"BetaExposureController: step {self._step} has non-finite stats {bad}; skipped "
                          f"(decisions whose reward needs them are dropped)", RuntimeWarning, stacklevel=2)
        loss, starts = st["loss"], self._in_window == 0
        credit = st["credit"] if self.uses_credit else 0.0
        acc = st.get("probe_accuracy") if self.config["signal"] == "accuracy" else None
        for d in self._pending:
            if acc is not None and math.isfinite(acc):  # measured before this step: after len(losses) updates
                d["points"].append((len(d["losses"]), acc))
            d["losses"].append(loss)
            d["starts"].append(starts)
            held = self._step - d["t0"] < self.K
            if held and self.uses_credit:
                d["credits"].append(credit)
            if not math.isfinite(loss) or (held and not math.isfinite(credit)):
                d["valid"] = False
            if d["scale"] is None and math.isfinite(loss) and len(d["losses"]) == 1:
                d["scale"] = abs(loss)
        beta = self.config["ema"]
        for k in ("loss", "mismatch", "probe_nll"):
            v = st.get(k)
            if v is not None and math.isfinite(v):
                self._ema[k] = v if self._ema[k] is None else beta * self._ema[k] + (1 - beta) * v
        if math.isfinite(st["confidence"]):
            self._conf_window.append(st["confidence"])
        if math.isfinite(st["progress"]):
            self._progress = min(1.0, max(0.0, st["progress"]))

        self._step += 1
        self._in_window += 1
        if self._in_window >= self.K:
            self._last_alpha = self._cur["alpha"]
            if self._conf_window:
                self._conf = sum(self._conf_window) / len(self._conf_window)
            self._conf_window = []
            self._cur = None
        done = [d for d in self._pending if len(d["losses"]) == self.L + 1]
        self._pending = [d for d in self._pending if len(d["losses"]) < self.L + 1]
        for d in done:
            self._score(d)
        bs = self.config["update_batch"]
        while len(self._ready) >= bs:
            batch, self._ready = self._ready[:bs], self._ready[bs:]
            self._update(batch)

    def _score(self, d: dict[str, Any]) -> None:
        """Reward d against the running statistics of *earlier* decisions (its baseline), then add d to
        them. The first decisions, before a standard deviation exists, only seed the statistics."""
        c = self.config
        accuracy = c["signal"] == "accuracy"
        # the accuracy signal needs its measurement at t0 and a later one; a non-finite loss still drops d
        if not d["valid"] or len(d["losses"]) < 2 or (accuracy and len(d.get("points", [])) < 2):
            self._counts["dropped"] += 1
            return
        scale = max(d["scale"] if d["scale"] is not None else 1.0, _EPS)
        horizon = 1 if c["one_step"] else None
        prog = accuracy_progress(d["points"], gamma=c["gamma"], horizon=horizon) if accuracy else None
        baseline_ready = self._pstats.ready
        r, prog, cred = decision_reward(
            d["losses"], d["credits"], d["starts"], gamma=c["gamma"], scale=scale, clip=c["clip"],
            lambda_gt=c["lambda_gt"], horizon=horizon, progress=prog,
            p_stats=(self._pstats.mean, self._pstats.sd), c_stats=(self._cstats.mean, self._cstats.sd),
        )
        if not (self.uses_credit and self._cstats.ready):  # no credit, or no credit baseline yet
            r = min(c["clip"], max(-c["clip"], (prog - self._pstats.mean) / self._pstats.sd))
        self._pstats.push(prog)
        if self.uses_credit:
            self._cstats.push(cred)
        if baseline_ready:
            self._ready.append({"t0": d["t0"], "alpha": d["alpha"], "state": d["state"], "reward": r,
                                "progress": prog, "credit": cred})
        # last_step: the last student step (0-based) observed when d was scored
        self.history.append({"t0": d["t0"], "alpha": d["alpha"], "reward": r if baseline_ready else 0.0,
                             "used": baseline_ready, "progress": prog, "credit": cred,
                             "steps_seen": len(d["losses"]), "last_step": self._step - 1})
        self._counts["scored"] += 1

    def _update(self, batch: list[dict[str, Any]]) -> None:
        s = torch.tensor([d["state"] for d in batch], dtype=torch.float32)
        x = torch.tensor([d["alpha"] for d in batch], dtype=torch.float32).clamp(_EPS, 1 - _EPS)
        adv = torch.tensor([d["reward"] for d in batch], dtype=torch.float32)
        a, b = self.beta_params(s)
        dist = torch.distributions.Beta(a, b)
        ent = dist.entropy()
        loss = -(adv * dist.log_prob(x)).mean() - self.config["entropy_coef"] * ent.clamp(
            max=self.config["entropy_cap"]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), self.config["grad_clip"])
        self.opt.step()
        self._counts["updates"] += 1
        self._last.update(policy_loss=loss.item(), entropy=ent.mean().item(), reward_mean=adv.mean().item(),
                          last_reward=batch[-1]["reward"],
                          progress_mean=sum(d["progress"] for d in batch) / len(batch),
                          credit_mean=sum(d["credit"] for d in batch) / len(batch))

    def finish(self) -> None:
        """End of training: score every pending decision on the steps it got (a discounted mean over a
        shorter lookahead; decisions with no step after t0 are dropped) and take one policy step on all
        scored decisions not yet used. Nothing completed is lost; the next exposure() samples afresh."""
        for d in self._pending:
            self._score(d)
        self._pending, self._cur = [], None
        if self._ready:
            batch, self._ready = self._ready, []
            self._update(batch)

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cur = None if self._cur is None else next(i for i, d in enumerate(self._pending) if d is self._cur)
        return copy.deepcopy({
            "kind": type(self).__name__, "config": self.config, "net": self.net.state_dict(),
            "opt": self.opt.state_dict(), "rng": self._rng.getstate(), "step": self._step,
            "in_window": self._in_window, "cur": cur, "last_alpha": self._last_alpha, "ema": self._ema,
            "progress": self._progress, "conf_window": self._conf_window, "conf": self._conf,
            "norm": self._norm, "pstats": self._pstats.state_dict(), "cstats": self._cstats.state_dict(),
            "pending": self._pending, "ready": self._ready, "counts": self._counts, "last": self._last,
            "history": list(self.history),
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # a setting added since the checkpoint was written had its default then
        saved = {**DEFAULTS, "one_step": self.config["one_step"], **state["config"]}
        diff = {k: (v, saved.get(k)) for k, v in self.config.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"controller config differs from the checkpoint (mine, checkpoint): {diff}")
        st = copy.deepcopy(dict(state))
        self.net.load_state_dict(st["net"])
        self.opt.load_state_dict(st["opt"])
        self._rng.setstate(_as_rng_state(st["rng"]))
        self._step, self._in_window = int(st["step"]), int(st["in_window"])
        self._last_alpha, self._ema, self._progress = st["last_alpha"], st["ema"], st["progress"]
        self._conf_window, self._conf, self._norm = st["conf_window"], st["conf"], st["norm"]
        self._pstats.load_state_dict(st["pstats"])
        self._cstats.load_state_dict(st["cstats"])
        self._pending, self._ready = st["pending"], st["ready"]
        self._counts, self._last = st["counts"], st["last"]
        self.history = deque(st["history"], maxlen=HISTORY)
        self._cur = None if st["cur"] is None else self._pending[st["cur"]]

    def metrics(self) -> dict[str, float]:
        return {**self._last, **{k: float(v) for k, v in self._counts.items()}}


class OneStepBetaController(BetaExposureController):
    """Ablation: the one-step reward (progress horizon H = 1: l_{t0} - l_{t0+1}), otherwise identical."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["one_step"] = True
        super().__init__(**kwargs)
