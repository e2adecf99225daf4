"""ATESD's Beta exposure controller (paper sections 4.2-4.3): a small policy over alpha in [0, 1], learned from a
delayed learning-progress reward.

State (6 features, computed when a decision is sampled):
    [progress, recent exposure, EMA loss, EMA mismatch, EMA probe NLL, batch confidence]
progress and recent exposure (the previous decision's alpha) are in [0, 1] and mapped to 2x - 1; the other
four are normalised online (Welford mean/variance per feature, clamped to +-5). A feature not yet seen
(e.g. probe NLL before the first probe) is 0. "Batch confidence" is the mean student max-probability over
the last completed hold window.

Policy: a, b = 1 + softplus(MLP(state)) (+1e-4) with MLP = Linear(6, hidden) -> tanh -> Linear(hidden, 2), so
a, b > 1 and the Beta is unimodal. The last layer starts at zero weight and bias softplus^-1(1): the first
decisions come from Beta(2, 2).

Timing: one alpha per hold window of K = `hold` steps; decision d (first step t0) is scored when step t0 + L
(L = `lookahead` > K) has been observed, by its progress P(d) (`estimator`: a least-squares slope of the signal
over the lookahead, or the paper's discounted mean of loss decreases; `controller.reward`) and the mean
teacher-grounded credit C(d) of its held steps. `finish()` scores the decisions still in flight on the steps
they got. K, L, gamma and the step size come from `controller.presets`: the default preset sizes them from the
run's `total_steps` (about 64 decisions per run); `paper` fixes them.

Updates (docs/controller.md derives them):
- ``update="reinforce"`` (the paper preset): every `update_batch` scored decisions, one `optimizer` step on
      policy_loss = -mean_j A_j log Beta(alpha_j; a(s_j), b(s_j)) - entropy_coef * mean_j min(H_j, entropy_cap)
  with A_j the reward standardised by running statistics of earlier decisions, centred and normalised in the
  batch when `baseline="batch"` (the paper).
- ``update="window"`` (default): after each scored decision, over the last decisions with weights lambda^age
  (lambda = `window_ema`), rewards r_i = clip(z(P_i)) + lambda_gt z(C_i) standardised within that window are
  regressed (weighted least squares, intercept) on the Beta's sufficient statistics x_i = (log alpha_i,
  log(1 - alpha_i)). For an exponential family the natural gradient of E[r] in (a, b) is F^-1 Cov(x, r) =
  Cov(x)^-1 Cov(x, r): the regression coefficients g. With R^2 the fit, n = (sum w)^2 / sum w^2 the effective
  number of decisions, F = (R^2 / 2) / ((1 - R^2) / (n - 3)) and E0 = (n - 3) / (n - 5) its mean when rewards do
  not depend on alpha:
      w = max(0, 1 - 2 E0 / F)        (snr_gate; 0 until n > 5)
      Delta(a, b) = lr (w g + F(a, b)^-1 grad entropy_coef min(H, entropy_cap))
  at the state of the next decision (F(a, b): the Beta's Fisher information); the step is capped at `max_kl` nats
  and at a concentration whose sd is `min_sd`, and made by the smallest parameter change that moves the MLP's
  output there. Rewards that carry no information leave w ~ 0: the policy stays near its prior.
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
from atesd.controller.presets import (
    BASELINES,
    DEFAULTS,
    ESTIMATORS,
    EXPLOITS,
    LEGACY,
    OPTIMIZERS,
    SETTINGS,
    SIGNALS,
    UPDATES,
    informs_a_later_decision,
    probe_stride,
    resolve,
    wants_measurement,
)
from atesd.controller.reward import (
    RunningStats,
    accuracy_progress,
    decision_reward,
    loss_slope_progress,
    slope_progress,
)

N_FEATURES = 6
HISTORY = 256
_EPS = 1e-6
_MIN_EXTRA = 1e-4  # a, b >= 1 + 1e-4 > 1 even where softplus underflows
_GATE_MIN_N = 5.0  # the F statistic (p = 2) has a finite mean under the null only for n > p + 3 = 5
EXPLOIT_GRID = tuple(i / 20 for i in range(1, 20))  # exploit_end="fit": the alphas its fitted curve is read at


class BetaExposureController(ExposurePolicy):
    """Adaptive exposure (ATESD). Every setting is optional: None takes the preset's value, sized from
    `total_steps` where the preset says so (`controller.presets.resolve`); a value given here wins.

    Args:
        total_steps: the run's length in student steps (the engine passes --steps); None: unknown (K = 4).
        preset: 'default' (ours: budget-sized, gated window steps) or 'paper' (batch-normalised REINFORCE).
        decisions: decisions per run the budget rule aims at.
        hold: K, steps one alpha is held.  lookahead: L > K, steps after a decision's first step its reward sees.
        gamma: per-step discount of the progress estimate.
        lambda_gt: weight of the teacher-grounded credit term (0: credit not needed, not computed).
        clip: the standardised progress term is clipped to [-clip, clip] (standard deviations).
        update: 'window' (gated natural-gradient step along the running gradient estimate) or 'reinforce'.
        lr: step size (window: natural-gradient step; reinforce: the optimizer's learning rate).
        update_batch: scored decisions per policy step.
        optimizer: 'sgd' or 'adam' (reinforce).  baseline: 'running' or 'batch' (reinforce; see module).
        snr_gate: scale each window step by the evidence that rewards depend on alpha (module docstring).
        window_ema: decay of the window's weights (its memory: ~1 / (1 - window_ema) decisions).
        max_kl: most nats one window step may move the Beta (0: no cap).
        min_sd: a window step never makes the Beta's sd smaller than this (0: no floor).
        entropy_coef, entropy_cap: capped entropy bonus (see module docstring).
        hidden: MLP width.  ema: decay of the loss / mismatch / probe-NLL EMAs of the state.
        reward_ema: decay of the running mean / sd that standardise progress and credit (reinforce, logs).
        grad_clip: max grad norm of a reinforce step.
        signal: 'loss' (the paper's KD loss), 'accuracy' (probe accuracy, measured where :meth:`wants` asks: at
            each decision's start and, on long holds, up to ``probe_points`` times per decision) or 'probe_nll'
            (the student's NLL of fixed reference solutions, which does not depend on alpha; measured where
            :meth:`wants` asks: ~4 times per hold window).
        estimator: 'slope' (least-squares slope over the lookahead) or 'delta' (the paper's discounted mean of
            same-alpha loss decreases; accuracy / probe NLL: the discounted mean change between measurements).
        probe_points: signal='accuracy': measurements per decision, at most one per 4 steps
            (``presets.accuracy_stride``; 1 for holds under 8 steps).
        detrend: the window regression also fits a linear trend in the decisions' start steps and gates on the
            alpha terms' partial share (measured on the simulated students, not adopted: docs/controller.md).
        exploit_end: what a decision takes when it is scored too late for any later decision of the run to use
            it (the last ceil((L + 1) / K) or so; ``presets.informs_a_later_decision``; needs ``total_steps``):
            'off' a draw, as every other decision; 'mean' the policy's mean a / (a + b); 'fit' the alpha on a 0.05
            grid that maximises the run's fitted reward curve (:meth:`fitted_best`), where that fit passes the
            noise gate, else a draw.
        one_step: ablation, progress horizon H = 1 instead of L (same timing, same everything else).
        seed: seeds the MLP init and the sampling RNG (random.Random, separate from torch's global RNG).
    """

    def __init__(
        self,
        total_steps: int | None = None,
        preset: str | None = None,
        decisions: int | None = None,
        hold: int | None = None,
        lookahead: int | None = None,
        gamma: float | None = None,
        lambda_gt: float | None = None,
        clip: float | None = None,
        update: str | None = None,
        lr: float | None = None,
        update_batch: int | None = None,
        optimizer: str | None = None,
        baseline: str | None = None,
        snr_gate: bool | None = None,
        window_ema: float | None = None,
        max_kl: float | None = None,
        min_sd: float | None = None,
        entropy_coef: float | None = None,
        entropy_cap: float | None = None,
        hidden: int | None = None,
        ema: float | None = None,
        reward_ema: float | None = None,
        grad_clip: float | None = None,
        signal: str | None = None,
        estimator: str | None = None,
        probe_points: int | None = None,
        detrend: bool | None = None,
        exploit_end: str | None = None,
        one_step: bool = False,
        seed: int = 0,
    ) -> None:
        given = {k: v for k, v in locals().items() if k in SETTINGS and v is not None}
        r = resolve(preset, total_steps, **given)
        ints, strs, bools = ("hold", "lookahead", "update_batch", "hidden", "probe_points"), \
            ("update", "optimizer", "baseline", "signal", "estimator", "exploit_end"), ("snr_gate", "detrend")
        c: dict[str, Any] = {k: (int(v) if k in ints else str(v) if k in strs else bool(v) if k in bools else
                                 None if v is None else int(v) if k == "decisions" else float(v))
                             for k, v in r.items()}
        c.update(one_step=bool(one_step), preset=preset or "default")
        self._check(c)
        self._given = set(given) | ({"preset"} if preset is not None else set())
        self.total_steps = None if total_steps is None else int(total_steps)
        self.config = c
        self._seed = seed
        self._build()
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
        self._window: list[dict[str, float]] = []  # the last scored decisions (update="window")
        self._counts = {"decisions": 0, "scored": 0, "dropped": 0, "updates": 0}
        self._pstats = RunningStats(c["reward_ema"])  # running mean / sd of P: the progress baseline
        self._cstats = RunningStats(c["reward_ema"])  # and of C
        self._probe_at: list[float] | None = None  # [step it precedes, value] of the latest probe NLL
        self._asked_probe = False  # asked for a probe NLL with the step now running
        self._missing_probe = 0  # steps asked for a probe NLL that came without one
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY)  # last scored decisions, for logs/tests
        # the window update's gate is logged from the first step: 0 (shut) until an update opens it
        self._last: dict[str, float] = {"gate": 0.0} if c["update"] == "window" else {}

    @staticmethod
    def _check(c: dict[str, Any]) -> None:
        if c["hold"] < 2:
            raise ValueError(f"hold (K) must be >= 2 (progress is measured inside a window), got {c['hold']}")
        if c["lookahead"] <= c["hold"]:
            raise ValueError(f"lookahead (L) must be > hold (K), got L={c['lookahead']}, K={c['hold']}")
        if not 0.0 < c["gamma"] <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {c['gamma']}")
        if c["clip"] <= 0 or c["lr"] <= 0 or c["hidden"] < 1 or c["grad_clip"] <= 0:
            raise ValueError(f"need clip, lr, grad_clip > 0, hidden >= 1; got {c['clip']}, {c['lr']}, "
                             f"{c['grad_clip']}, {c['hidden']}")
        if min(c["lambda_gt"], c["entropy_coef"], c["max_kl"]) < 0 or not 0 <= c["min_sd"] < 0.5:
            raise ValueError(f"lambda_gt, entropy_coef, max_kl must be >= 0 and min_sd in [0, 0.5), got "
                             f"{c['lambda_gt']}, {c['entropy_coef']}, {c['max_kl']}, {c['min_sd']}")
        if c["update_batch"] < 1 or (c["decisions"] is not None and c["decisions"] < 1):
            raise ValueError(f"update_batch and decisions must be >= 1, got {c['update_batch']}, {c['decisions']}")
        if c["probe_points"] < 1:
            raise ValueError(f"probe_points must be >= 1, got {c['probe_points']}")
        for key, allowed in (("signal", SIGNALS), ("update", UPDATES), ("optimizer", OPTIMIZERS),
                             ("baseline", BASELINES), ("estimator", ESTIMATORS), ("exploit_end", EXPLOITS)):
            if c[key] not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {c[key]!r}")
        if c["estimator"] == "level" and c["signal"] == "loss":
            raise ValueError("estimator='level' needs a measured signal (accuracy or probe_nll): the loss level "
                             "depends on alpha through the mismatch")
        if c["snr_gate"] and c["update"] != "window":
            raise ValueError("snr_gate needs update='window' (reinforce steps are not gated)")
        if not all(0.0 <= c[k] < 1.0 for k in ("ema", "reward_ema", "window_ema")):
            raise ValueError(f"ema, reward_ema and window_ema must be in [0, 1), got {c['ema']}, {c['reward_ema']}, "
                             f"{c['window_ema']}")

    def _build(self) -> None:
        """The MLP (Beta(2, 2) everywhere at the start) and, for reinforce, its optimizer, from self.config."""
        c = self.config
        self.K, self.L = c["hold"], c["lookahead"]
        g = torch.Generator().manual_seed(self._seed)
        # nn.Linear draws its default init from the global generator: built under a fork of it, so making a
        # controller leaves the caller's random stream (an engine's LoRA init, say) where it was
        with torch.random.fork_rng(devices=[]):
            self.net = nn.Sequential(nn.Linear(N_FEATURES, c["hidden"]), nn.Tanh(), nn.Linear(c["hidden"], 2))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(N_FEATURES)
            nn.init.uniform_(self.net[0].weight, -bound, bound, generator=g)
            nn.init.uniform_(self.net[0].bias, -bound, bound, generator=g)
            self.net[2].weight.zero_()
            self.net[2].bias.fill_(math.log(math.e - 1.0))  # softplus^-1(1): Beta(2, 2) at start
        self.opt = None  # the window update steps the parameters itself
        if c["update"] == "reinforce":
            opt = torch.optim.Adam if c["optimizer"] == "adam" else torch.optim.SGD
            self.opt = opt(self.net.parameters(), lr=c["lr"])

    @property
    def uses_credit(self) -> bool:
        return self.config["lambda_gt"] > 0

    # ---- policy -------------------------------------------------------------------------------------
    def beta_params(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """state [..., 6] float32 -> (a, b), each [...] and > 1."""
        ab = 1.0 + _MIN_EXTRA + F.softplus(self.net(state))  # softplus underflows to 0 in fp32
        return ab[..., 0], ab[..., 1]

    def _features(self, update: bool = True) -> list[float]:
        raw = [self._ema["loss"], self._ema["mismatch"], self._ema["probe_nll"], self._conf]
        nrm = self._norm
        recent = 0.5 if self._last_alpha is None else self._last_alpha
        out = [2.0 * self._progress - 1.0, 2.0 * recent - 1.0]
        for j, x in enumerate(raw):
            if x is None:
                out.append(0.0)
                continue
            n, mean, m2 = nrm["n"][j], nrm["mean"][j], nrm["m2"][j]
            n += 1
            d = x - mean
            mean += d / n
            m2 += d * (x - mean)
            if update:
                nrm["n"][j], nrm["mean"][j], nrm["m2"][j] = n, mean, m2
            var = m2 / n
            out.append(max(-5.0, min(5.0, (x - mean) / math.sqrt(var + 1e-8))) if var > 0 else 0.0)
        return out

    def current_beta(self) -> tuple[float, float]:
        """(a, b) the policy would sample the next decision from, without sampling or changing any state."""
        with torch.no_grad():
            a, b = self.beta_params(torch.tensor(self._features(update=False), dtype=torch.float32))
        return float(a), float(b)

    def _decide(self) -> dict[str, Any]:
        s = self._features()
        with torch.no_grad():
            a, b = self.beta_params(torch.tensor(s, dtype=torch.float32))
        a, b = float(a), float(b)
        fixed = self._exploit(a, b)
        alpha = self._rng.betavariate(a, b) if fixed is None else fixed
        d = {"t0": self._step, "alpha": alpha, "state": s, "a": a, "b": b, "scale": self._ema["loss"],
             "losses": [], "starts": [], "credits": [], "points": [], "valid": True}
        if self.config["signal"] == "probe_nll":
            d["nll_scale"] = self._ema["probe_nll"]
            if self._probe_at is not None and self._probe_at[0] == self._step:  # measured just before t0
                d["points"].append([0, self._probe_at[1]])
        self._pending.append(d)
        self._in_window = 0
        self._counts["decisions"] += 1
        self._last.update(alpha=alpha, beta_a=a, beta_b=b, beta_mean=a / (a + b), beta_concentration=a + b)
        if self.config["exploit_end"] != "off":
            self._last["exploit"] = float(fixed is not None)
        return d

    def _exploit(self, a: float, b: float) -> float | None:
        """exploit_end: the alpha of a decision starting now that no later decision can learn from (None: draw)."""
        mode = self.config["exploit_end"]
        if mode == "off" or informs_a_later_decision(self._step, self.K, self.L, self.total_steps):
            return None
        return a / (a + b) if mode == "mean" else self.fitted_best()

    def fitted_best(self) -> float | None:
        """The alpha on a 0.05 grid (0.05-0.95) maximising the run's fitted reward curve g1 log alpha + g2 log(1 -
        alpha): the least-squares fit of every scored decision's reward (the last HISTORY; progress, and credit when
        used, standardised over them as in the window update) on the Beta's sufficient statistics, equally weighted.
        None when that fit does not pass the noise gate (the window update's F test) or has fewer than 6 points."""
        hist = list(self.history)
        if len(hist) < 6:
            return None
        ones = [1.0] * len(hist)
        rewards = _standardised([h["progress"] for h in hist], ones, self.config["clip"])
        if self.uses_credit:
            credits = _standardised([h["credit"] for h in hist], ones, self.config["clip"])
            rewards = [r + self.config["lambda_gt"] * z for r, z in zip(rewards, credits)]
        (g1, g2), r2, n = _weighted_regression([_sufficient(h["alpha"]) for h in hist], rewards, ones, None)
        if _gate_value(r2, n) <= 0:
            return None
        return max(EXPLOIT_GRID, key=lambda x: g1 * math.log(x) + g2 * math.log1p(-x))

    def exposure(self) -> float:
        if self._cur is None:
            self._cur = self._decide()
        return self._cur["alpha"]

    def probe_stride(self) -> int:
        """signal='probe_nll': a probe NLL after every this many updates of a window (and after its last)."""
        return probe_stride(self.K)

    def wants(self, key: str) -> bool:
        """probe_accuracy: before the update of each decision's first step and of every
        `presets.accuracy_stride(K, probe_points)`-th step after it;
        probe_nll: with the step about to run, measured after its update, every `probe_stride()` steps of a window
        and after its last step (the state the next decision starts from). `presets.wants_measurement`."""
        pos = 0 if self._cur is None else self._in_window  # the next observed step's place in its window
        wanted = wants_measurement(key, self.config["signal"], pos, self.K, self.config["probe_points"])
        if key == "probe_nll" and self.config["signal"] == "probe_nll":
            self._asked_probe = wanted
        return wanted

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
        signal = self.config["signal"]
        loss, starts = st["loss"], self._in_window == 0
        credit = st["credit"] if self.uses_credit else 0.0
        acc = st.get("probe_accuracy") if signal == "accuracy" else None
        nll = st.get("probe_nll") if signal == "probe_nll" else None
        if signal == "probe_nll" and self._asked_probe and nll is None:
            self._missing_probe += 1
            if self._missing_probe == 1:
                warnings.warn("BetaExposureController: signal='probe_nll' asked for a probe NLL and got none "
                              "(is the probe set empty?); decisions without two measurements are dropped",
                              RuntimeWarning, stacklevel=2)
        self._asked_probe = False
        for d in self._pending:
            if acc is not None and math.isfinite(acc):  # measured before this step: after len(losses) updates
                d["points"].append([len(d["losses"]), acc])
            d["losses"].append(loss)
            if nll is not None and math.isfinite(nll) and len(d["losses"]) <= self.L:  # after this step's update
                d["points"].append([len(d["losses"]), nll])
            d["starts"].append(starts)
            held = self._step - d["t0"] < self.K
            if held and self.uses_credit:
                d["credits"].append(credit)
            if not math.isfinite(loss) or (held and not math.isfinite(credit)):
                d["valid"] = False
            if d["scale"] is None and math.isfinite(loss) and len(d["losses"]) == 1:
                d["scale"] = abs(loss)
            if d.get("nll_scale", 0.0) is None and nll is not None and math.isfinite(nll):
                d["nll_scale"] = abs(nll)
        if nll is not None and math.isfinite(nll):
            self._probe_at = [self._step + 1, nll]
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

    def _progress_of(self, d: dict[str, Any]) -> float | None:
        """P(d) from its recorded signal (None: the paper's loss progress, computed by decision_reward)."""
        c = self.config
        horizon = 1 if c["one_step"] else None
        if c["signal"] == "loss":
            scale = max(d["scale"] if d["scale"] is not None else 1.0, _EPS)
            if c["estimator"] == "delta":
                return None  # decision_reward computes the paper's learning_progress from the losses
            return loss_slope_progress(d["losses"], d["starts"], gamma=c["gamma"], scale=scale, horizon=horizon)
        sign, scale = 1.0, 1.0
        if c["signal"] == "probe_nll":  # a decrease is progress; relative to the NLL level at t0
            sign, scale = -1.0, max(abs(d["nll_scale"]) if d.get("nll_scale") is not None else 1.0, _EPS)
        if c["estimator"] == "delta":
            return accuracy_progress([(i, sign * v / scale) for i, v in d["points"]], gamma=c["gamma"],
                                     horizon=horizon)
        if c["estimator"] == "level":  # the level the held exposure led to: measured after 1..K of its steps
            held = [v for i, v in d["points"] if 1 <= i <= self.K]
            return sign * sum(held) / len(held) / scale if held else None
        pts = [(i, v, 0) for i, v in d["points"] if horizon is None or i <= horizon]
        return sign * slope_progress(pts, gamma=c["gamma"]) / scale

    def _score(self, d: dict[str, Any]) -> None:
        """Reward d against the running statistics of *earlier* decisions (its baseline), then add d to
        them. For reinforce the first decisions, before a standard deviation exists, only seed the statistics;
        the window update uses every scored decision (it standardises within its window)."""
        c = self.config
        measured = c["signal"] != "loss"
        # a measured signal needs two points in the lookahead; a non-finite loss still drops d
        if not d["valid"] or len(d["losses"]) < 2 or (measured and len(d.get("points", [])) < 2):
            self._counts["dropped"] += 1
            return
        prog = self._progress_of(d)
        if measured and prog is None:  # estimator='level' with no measurement inside the hold
            self._counts["dropped"] += 1
            return
        scale = max(d["scale"] if d["scale"] is not None else 1.0, _EPS)
        horizon = 1 if c["one_step"] else None
        window = c["update"] == "window"
        used = self._pstats.ready or window
        r, prog, cred = decision_reward(
            d["losses"], d["credits"], d["starts"], gamma=c["gamma"], scale=scale, clip=c["clip"],
            lambda_gt=c["lambda_gt"], horizon=horizon, progress=prog,
            p_stats=(self._pstats.mean, self._pstats.sd), c_stats=(self._cstats.mean, self._cstats.sd),
        )
        if not (self.uses_credit and self._cstats.ready):  # no credit, or no credit baseline yet
            r = min(c["clip"], max(-c["clip"], (prog - self._pstats.mean) / self._pstats.sd))
        if not self._pstats.ready:
            r = 0.0
        self._pstats.push(prog)
        if self.uses_credit:
            self._cstats.push(cred)
        if window:
            self._window.append({"P": prog, "C": cred, "alpha": d["alpha"], "a": d["a"], "b": d["b"],
                                 "t0": d["t0"]})
            del self._window[:-_window_length(c["window_ema"])]
        if used:
            self._ready.append({"t0": d["t0"], "alpha": d["alpha"], "state": d["state"], "reward": r,
                                "progress": prog, "credit": cred})
        # last_step: the last student step (0-based) observed when d was scored
        self.history.append({"t0": d["t0"], "alpha": d["alpha"], "reward": r, "used": used, "progress": prog,
                             "credit": cred, "steps_seen": len(d["losses"]), "last_step": self._step - 1})
        self._counts["scored"] += 1

    def _update(self, batch: list[dict[str, Any]]) -> None:
        c = self.config
        if c["update"] == "window":
            g, w = self.window_gradient()
            self._natural_step(self._features(update=False), [w * g[0], w * g[1]])
            self._last["gate"] = w
        else:
            s = torch.tensor([d["state"] for d in batch], dtype=torch.float32)
            x = torch.tensor([d["alpha"] for d in batch], dtype=torch.float32).clamp(_EPS, 1 - _EPS)
            adv = torch.tensor([d["reward"] for d in batch], dtype=torch.float32)
            if c["baseline"] == "batch":  # the paper: centred and normalised in the batch
                sd = adv.std(unbiased=False)
                adv = (adv - adv.mean()) / (sd + 1e-8) if sd > 1e-8 else torch.zeros_like(adv)
            a, b = self.beta_params(s)
            dist = torch.distributions.Beta(a, b)
            ent = dist.entropy()
            loss = -(adv * dist.log_prob(x)).mean() - c["entropy_coef"] * ent.clamp(max=c["entropy_cap"]).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), c["grad_clip"])
            self.opt.step()
            self._last.update(policy_loss=loss.item(), entropy=ent.mean().item())
        self._counts["updates"] += 1
        self._last.update(reward_mean=sum(d["reward"] for d in batch) / len(batch), last_reward=batch[-1]["reward"],
                          progress_mean=sum(d["progress"] for d in batch) / len(batch),
                          credit_mean=sum(d["credit"] for d in batch) / len(batch))

    def window_gradient(self) -> tuple[list[float], float]:
        """(g, w) of the window update (module docstring): g, the natural gradient of the expected reward in (a, b),
        estimated as the weighted least-squares coefficients of the window's rewards (standardised within it) on
        the Beta's sufficient statistics (log alpha, log(1 - alpha)); w, the SNR gate (1 without snr_gate)."""
        c, win = self.config, self._window
        lam = c["window_ema"]
        weights = [lam ** (len(win) - 1 - i) for i in range(len(win))]
        rewards = _standardised([d["P"] for d in win], weights, c["clip"])
        if self.uses_credit:
            rewards = [r + c["lambda_gt"] * z for r, z in zip(rewards, _standardised([d["C"] for d in win], weights,
                                                                                     c["clip"]))]
        feats = [_sufficient(d["alpha"]) for d in win]
        # detrend: a linear trend in the decision's start absorbs the fall of progress as the student learns (which
        # no exposure causes); the gate then weighs the alpha terms' share of what the trend leaves
        trend = [float(d.get("t0", i)) for i, d in enumerate(win)] if c["detrend"] else None
        beta, r2, n = _weighted_regression(feats, rewards, weights, trend)
        return beta, (_gate_value(r2, n, 3 if trend else 2) if c["snr_gate"] else 1.0)

    def _natural_step(self, state: list[float], grad_ab: list[float]) -> None:
        """Move the Beta at ``state`` by lr (grad_ab + F^-1 entropy bonus gradient) in (a, b) (grad_ab: a natural
        gradient already), at most max_kl nats
        (KL to second order) and no narrower than min_sd, through the smallest parameter change
        (J^T (J J^T)^-1) that moves the MLP's two outputs z (a = 1 + 1e-4 + softplus(z_1), likewise b) there."""
        c = self.config
        params = list(self.net.parameters())
        z = self.net(torch.tensor(state, dtype=torch.float32))
        ab = (1.0 + _MIN_EXTRA + F.softplus(z.detach())).double().requires_grad_(True)
        ent = torch.distributions.Beta(ab[0], ab[1]).entropy()
        (grad,) = torch.autograd.grad(c["entropy_coef"] * ent.clamp(max=c["entropy_cap"]), ab, allow_unused=True)
        fisher = _beta_fisher(ab.detach())
        bonus = torch.zeros(2, dtype=torch.float64) if grad is None else torch.linalg.solve(fisher, grad)
        step = c["lr"] * (torch.tensor(grad_ab, dtype=torch.float64) + bonus)  # both natural gradients
        kl = 0.5 * float(step @ fisher @ step)
        if c["max_kl"] > 0 and kl > c["max_kl"]:
            step = step * math.sqrt(c["max_kl"] / kl)
            kl = c["max_kl"]
        new = (ab.detach() + step).clamp(min=1.0 + 2 * _MIN_EXTRA)
        if c["min_sd"] > 0:  # at most the concentration n whose sd is min_sd: m (1 - m) / (n + 1) = min_sd^2
            n, m = float(new.sum()), float(new[0] / new.sum())
            n_max = max(m * (1 - m) / c["min_sd"] ** 2 - 1.0, 2.0 + 4 * _MIN_EXTRA)
            if n > n_max:
                new = (new * (n_max / n)).clamp(min=1.0 + 2 * _MIN_EXTRA)
        target = new - 1.0 - _MIN_EXTRA
        dz = (target + torch.log(-torch.expm1(-target))).float() - z.detach()  # softplus^-1(target) - z
        rows = [torch.autograd.grad(z[k], params, retain_graph=k == 0) for k in range(2)]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])  # [2, P]
        delta = jac.T @ torch.linalg.solve(jac @ jac.T + 1e-8 * torch.eye(2), dz)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(delta[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self._last.update(entropy=float(ent.detach()), step_kl=kl)

    def finish(self) -> None:
        """End of training: score every pending decision on the steps it got (decisions with no step after t0,
        or a measured signal with fewer than two measurements, are dropped) and take one policy step on all
        scored decisions not yet used. Nothing completed is lost; the next exposure() samples afresh."""
        for d in self._pending:
            self._score(d)
        self._pending, self._cur = [], None
        if self._ready:
            batch, self._ready = self._ready, []
            self._update(batch)

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data only (tensors, numbers, strings, lists, dicts, None): safe to store without pickle."""
        cur = None if self._cur is None else next(i for i, d in enumerate(self._pending) if d is self._cur)
        return copy.deepcopy({
            "kind": type(self).__name__, "config": self.config, "net": self.net.state_dict(),
            "opt": None if self.opt is None else self.opt.state_dict(), "rng": _plain(self._rng.getstate()),
            "step": self._step, "in_window": self._in_window, "cur": cur, "last_alpha": self._last_alpha,
            "ema": self._ema, "progress": self._progress, "conf_window": self._conf_window, "conf": self._conf,
            "norm": self._norm, "pstats": self._pstats.state_dict(), "cstats": self._cstats.state_dict(),
            "pending": self._pending, "ready": self._ready, "counts": self._counts, "last": self._last,
            "history": list(self.history), "window": self._window, "probe_at": self._probe_at,
            "asked_probe": self._asked_probe, "missing_probe": self._missing_probe,
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``. A setting this controller was given explicitly must match the checkpoint's
        (ValueError naming the differences); every other one (preset or budget-sized: e.g. K after --steps was
        raised on resume) takes the checkpoint's value, so the run continues on its own schedule. A state written
        before a setting existed holds what that setting meant then (presets.LEGACY)."""
        saved = {**LEGACY, "preset": "default", **state["config"]}
        mine = self.config
        diff = {k: (mine[k], saved.get(k)) for k in mine
                if (k in self._given or k == "one_step") and saved.get(k) != mine[k]}
        if diff:
            raise ValueError(f"controller config differs from the checkpoint (mine, checkpoint): {diff}")
        adopted = {**mine, **{k: saved[k] for k in mine if k in saved}}
        if adopted != mine:
            self._check(adopted)
            self.config = adopted
            self._build()
        st = copy.deepcopy(dict(state))
        self.net.load_state_dict(st["net"])
        if self.opt is not None:
            self.opt.load_state_dict(st["opt"])
        self._rng.setstate(_as_rng_state(st["rng"]))
        self._step, self._in_window = int(st["step"]), int(st["in_window"])
        self._last_alpha, self._ema, self._progress = st["last_alpha"], st["ema"], st["progress"]
        self._conf_window, self._conf, self._norm = st["conf_window"], st["conf"], st["norm"]
        self._pstats = RunningStats(self.config["reward_ema"])
        self._cstats = RunningStats(self.config["reward_ema"])
        self._pstats.load_state_dict(st["pstats"])
        self._cstats.load_state_dict(st["cstats"])
        self._pending, self._ready = st["pending"], st["ready"]
        self._counts, self._last = st["counts"], st["last"]
        self.history = deque(st["history"], maxlen=HISTORY)
        self._cur = None if st["cur"] is None else self._pending[st["cur"]]
        self._window = st.get("window", [])
        self._probe_at = st.get("probe_at")
        self._asked_probe = bool(st.get("asked_probe", False))
        self._missing_probe = int(st.get("missing_probe", 0))

    def metrics(self) -> dict[str, float]:
        return {**self._last, **{k: float(v) for k, v in self._counts.items()}}


class OneStepBetaController(BetaExposureController):
    """Ablation: the one-step reward (progress horizon H = 1: l_{t0} - l_{t0+1}), otherwise identical."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["one_step"] = True
        super().__init__(**kwargs)


# ---- the window update's statistics ---------------------------------------------------------------------
def _standardised(values: list[float], weights: list[float], clip: float) -> list[float]:
    """(v - weighted mean) / weighted sd, clipped to [-clip, clip] (sd 1 when the values are all equal)."""
    total = sum(weights)
    m = sum(w * v for w, v in zip(weights, values)) / total
    var = sum(w * (v - m) ** 2 for w, v in zip(weights, values)) / total
    sd = math.sqrt(var) if var > 1e-30 else 1.0
    return [min(clip, max(-clip, (v - m) / sd)) for v in values]


def _sufficient(alpha: float) -> tuple[float, float]:
    """The Beta's sufficient statistics (log alpha, log(1 - alpha)), alpha kept inside (0, 1)."""
    a = min(max(alpha, _EPS), 1 - _EPS)
    return math.log(a), math.log1p(-a)


def _window_length(decay: float) -> int:
    """Decisions kept for the window: weights below decay^L ~ e^-3 are dropped."""
    return max(8, math.ceil(3.0 / (1.0 - decay)))


def _weighted_regression(x: list[tuple[float, float]], y: list[float], w: list[float],
                         trend: list[float] | None = None) -> tuple[list[float], float, float]:
    """Weighted least squares of y on two regressors with an intercept: (coefficients, R^2, effective n =
    (sum w)^2 / sum w^2). Degenerate inputs (n < 2, no spread) give zero coefficients and R^2 = 0. With ``trend``
    (one value per row, e.g. time), the trend is partialled out of y and of both regressors first (Frisch-Waugh:
    the same coefficients as the regression on both and the trend) and R^2 is the partial one, the share of what the
    trend leaves that the two regressors explain."""
    sw = sum(w)
    if len(y) < 2 or sw <= 0:
        return [0.0, 0.0], 0.0, float(len(y))
    n = sw * sw / sum(v * v for v in w)
    if trend is not None:
        mt = sum(wi * ti for wi, ti in zip(w, trend)) / sw
        tc = [ti - mt for ti in trend]
        stt = sum(wi * ti * ti for wi, ti in zip(w, tc))
        if stt > 0:
            def resid(v: list[float]) -> list[float]:
                mv = sum(wi * vi for wi, vi in zip(w, v)) / sw
                k = sum(wi * ti * (vi - mv) for wi, ti, vi in zip(w, tc, v)) / stt
                return [vi - mv - k * ti for vi, ti in zip(v, tc)]

            y = resid(y)
            cols = [resid([xi[0] for xi in x]), resid([xi[1] for xi in x])]
            x = list(zip(cols[0], cols[1]))
    mx = [sum(wi * xi[k] for wi, xi in zip(w, x)) / sw for k in range(2)]
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    xc = [(xi[0] - mx[0], xi[1] - mx[1]) for xi in x]
    yc = [yi - my for yi in y]
    sxx = [[sum(wi * a[j] * a[k] for wi, a in zip(w, xc)) for k in range(2)] for j in range(2)]
    sxy = [sum(wi * a[j] * b for wi, a, b in zip(w, xc, yc)) for j in range(2)]
    syy = sum(wi * b * b for wi, b in zip(w, yc))
    det = sxx[0][0] * sxx[1][1] - sxx[0][1] * sxx[1][0]
    if det <= 1e-12 * max(sxx[0][0] * sxx[1][1], 1e-300) or syy <= 0:
        return [0.0, 0.0], 0.0, n
    coef = [(sxx[1][1] * sxy[0] - sxx[0][1] * sxy[1]) / det, (sxx[0][0] * sxy[1] - sxx[1][0] * sxy[0]) / det]
    r2 = min(1.0, max(0.0, (coef[0] * sxy[0] + coef[1] * sxy[1]) / syy))
    return coef, r2, n


def _gate_value(r2: float, n: float, q: int = 2) -> float:
    """w = max(0, 1 - 2 E0 / F) for the regression's F = (R^2 / 2) / ((1 - R^2) / (n - q - 1)) on the two alpha
    terms (q regressors in all: 2, or 3 with a trend, R^2 then the partial one), and E0 = (n - q - 1) / (n - q - 3),
    the mean of F when the rewards do not depend on alpha. 0 until n > q + 3."""
    if n <= _GATE_MIN_N + (q - 2) + 1e-9:
        return 0.0
    if r2 >= 1.0 - 1e-12:
        return 1.0
    f = (r2 / 2.0) / ((1.0 - r2) / (n - q - 1.0))
    e0 = (n - q - 1.0) / (n - q - 3.0)
    return max(0.0, 1.0 - 2.0 * e0 / f) if f > 0 else 0.0


def _beta_fisher(ab: torch.Tensor) -> torch.Tensor:
    """Fisher information of Beta(a, b) in (a, b): [[psi1(a) - psi1(a+b), -psi1(a+b)], [., psi1(b) - psi1(a+b)]]."""
    t = torch.special.polygamma(1, torch.stack([ab[0], ab[1], ab[0] + ab[1]]))
    return torch.stack([torch.stack([t[0] - t[2], -t[2]]), torch.stack([-t[2], t[1] - t[2]])])


def _plain(x: Any) -> Any:
    """Tuples to lists, recursively: a random.Random state as JSON-like data."""
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


__all__ = ["DEFAULTS", "BetaExposureController", "OneStepBetaController"]
