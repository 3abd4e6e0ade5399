"""The two-stage (warm-start) schedule: when layer 2's losses join the total loss.

Three modes (:class:`WarmStartConfig.mode`):

``"mi"`` (default, the paper)
    Layer 2 switches on "once the first layer's MI loss approaches 0". The
    CLUB estimate is noisy and can be negative, so the trigger works on a
    moving average: the mean of the raw observations of the last
    ``window_steps`` steps. Layer 2 switches on at the first observation at
    which that smoothed value has stayed below ``mi_threshold`` at every
    observation since a step at least ``patience_steps`` earlier. Both
    lengths are in training steps, so they mean the same whatever the
    logging interval (the trainer observes only on logging steps, every k
    steps; with k = 50 and ``patience_steps = 300``, seven observations in a
    row must be below the threshold). The patience count starts no earlier
    than epoch ``mi_min_epoch`` (observations before it only fill the
    window): at the start of training CLUB's q(y|x) is not fitted
    yet and its estimate sits near 0 whatever the encoders do, so an early
    low value means nothing. If the MI never settles, layer 2 switches on
    anyway at ``fallback_epoch`` or ``fallback_step`` (whichever comes
    first; ``None`` disables one), and the switch record says so. Layer 2's
    losses are then weighted by ``layer2_loss_weight`` (1.0: the paper's loss
    weights are all 1; it scales layer 2's whole loss, whereas
    ``model.weights.mi_layer2`` scales only layer 2's CLUB term). With ``mi_rel_threshold = r > 0`` the bound is
    ``max(mi_threshold, r x the largest smoothed MI so far)``: "approaches 0"
    relative to the run's own MI curve, whose scale depends on the data and
    the CLUB net.

``"epoch"`` (the authors' two-layer code)
    Layer-1 losses only for epochs ``0 .. switch_epoch - 1``, then layer-1
    losses + ``epoch_layer2_weight`` (0.3) x layer-2 losses.

``"off"``
    Layer 2 on from the first step with weight ``layer2_loss_weight``.

Defaults and their reasons: ``mi_threshold = 0.05`` nats, compared with
the layer-1 MI estimate averaged over the modalities (small against the
values of an estimate whose general and specific features still share
information, and inside the noise band around 0 of a settled one);
``mi_rel_threshold = 0.3`` (the smoothed MI has fallen to under 30% of its
own peak: on the ``small`` plan the absolute 0.05 was never reached, the
smoothed minimum sat at 0.06-0.12, so only the fallback ever switched);
``window_steps = 20`` and ``patience_steps = 20`` (a few batches' worth of
CLUB noise, short enough that the trigger can act inside the two epochs
between ``mi_min_epoch`` and the fallback of a short plan; the ``small`` plan
has 45 steps per epoch); ``mi_min_epoch = 1``; ``fallback_epoch = 3`` (the
authors' fixed switch epoch, leaving layer 2 half of a six-epoch run). On a
long plan (about 500 steps per epoch on VGGSound-AVEL 40k at batch 80) a
longer ``window_steps`` / ``patience_steps`` smooths more; check a run's
``mi/l1`` curve. ``--set profile=authors`` uses the fixed epoch-3 switch.

Every rank must take the same decision. The trainer averages the MI value
across ranks before :meth:`WarmStart.observe` and passes the same step and
epoch everywhere; the decision is then a deterministic function of identical
inputs, and no extra collective is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from srcid.errors import SrcidError

MODES = ("mi", "epoch", "off")
_STATE_VERSION = 2  # 2 adds the peak; version 1 states (no peak) still load


# keys added after runs were first saved, with what a saved run config that lacks them meant (see srcid.config)
ABSENT_MEANS = {"mi_rel_threshold": 0.0}


@dataclass
class WarmStartConfig:
    """Settings of the two-stage schedule (see the module docstring)."""

    mode: Literal["mi", "epoch", "off"] = "mi"
    mi_threshold: float = 0.05
    # "settled" also when the smoothed MI is below this fraction of its own peak so far (0: absolute threshold only)
    mi_rel_threshold: float = 0.3
    window_steps: int = 20
    patience_steps: int = 20
    mi_min_epoch: int = 1
    fallback_epoch: int | None = 3
    fallback_step: int | None = None
    layer2_loss_weight: float = 1.0  # layer 2's whole loss after the switch in modes "mi" and "off"
    switch_epoch: int = 3
    epoch_layer2_weight: float = 0.3

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SrcidError(f"warm_start.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not math.isfinite(self.mi_threshold):
            raise SrcidError(f"warm_start.mi_threshold must be a finite number, got {self.mi_threshold}")
        if not (math.isfinite(self.mi_rel_threshold) and 0.0 <= self.mi_rel_threshold < 1.0):
            raise SrcidError(f"warm_start.mi_rel_threshold must lie in [0, 1), got {self.mi_rel_threshold}")
        if self.window_steps < 1:
            raise SrcidError(f"warm_start.window_steps must be >= 1, got {self.window_steps}")
        for name in ("patience_steps", "mi_min_epoch", "switch_epoch"):
            if getattr(self, name) < 0:
                raise SrcidError(f"warm_start.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("fallback_epoch", "fallback_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SrcidError(f"warm_start.{name} must be >= 0 or None, got {value}")
        for name in ("layer2_loss_weight", "epoch_layer2_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SrcidError(f"warm_start.{name} must be a positive number, got {value}")


class WarmStart:
    """Decides, from the layer-1 MI estimate or the epoch, when layer 2's losses switch on.

    Call :meth:`start_epoch` at the start of every epoch and :meth:`observe`
    on logging steps with the rank-averaged layer-1 MI estimate; read
    :attr:`layer2_weight` when building the total loss. The switch is
    one-way: once on, layer 2 stays on.
    """

    def __init__(self, config: WarmStartConfig | None = None):
        self.config = config if config is not None else WarmStartConfig()
        self.config.validate()
        self._window: list[tuple[int, float]] = []
        self._below_since: int | None = None
        self._peak: float | None = None  # the largest smoothed MI seen so far
        self._last_step: int | None = None
        self._record: dict | None = None
        if self.config.mode == "off":
            self._record = {"step": 0, "epoch": 0, "smoothed_mi": None,
                            "reason": "warm start off: layer 2 on from the first step"}

    @property
    def switched(self) -> bool:
        """Whether layer 2's losses are on."""
        return self._record is not None

    @property
    def layer2_weight(self) -> float:
        """Weight of layer 2's losses in the total loss: 0 before the switch."""
        if not self.switched:
            return 0.0
        if self.config.mode == "epoch":
            return float(self.config.epoch_layer2_weight)
        return float(self.config.layer2_loss_weight)

    @property
    def switch_record(self) -> dict | None:
        """``{"step", "epoch", "smoothed_mi", "reason"}`` of the switch, or None before it."""
        return dict(self._record) if self._record is not None else None

    @property
    def smoothed_mi(self) -> float | None:
        """Mean of the observations inside the window (None before any)."""
        if not self._window:
            return None
        return math.fsum(value for _, value in self._window) / len(self._window)

    @property
    def threshold(self) -> float:
        """The bound the smoothed MI must stay under: ``mi_threshold``, or ``mi_rel_threshold`` x its peak if larger."""
        cfg = self.config
        if cfg.mi_rel_threshold > 0 and self._peak is not None:
            return max(cfg.mi_threshold, cfg.mi_rel_threshold * self._peak)
        return cfg.mi_threshold

    def _switch(self, step: int, epoch: int, reason: str) -> None:
        self._record = {"step": int(step), "epoch": int(epoch), "smoothed_mi": self.smoothed_mi, "reason": reason}

    def _check_step(self, step: int, epoch: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SrcidError(f"warm start: step must be a non-negative int, got {step!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise SrcidError(f"warm start: epoch must be a non-negative int, got {epoch!r}")
        if self._last_step is not None and step < self._last_step:
            raise SrcidError(f"warm start: step {step} comes after step {self._last_step}; steps must not go back")
        self._last_step = step

    def _check_schedule(self, step: int, epoch: int) -> None:
        cfg = self.config
        if cfg.mode == "epoch" and epoch >= cfg.switch_epoch:
            self._switch(step, epoch, f"fixed schedule: epoch {epoch} >= switch_epoch {cfg.switch_epoch}")
        elif cfg.mode == "mi":
            smoothed = self.smoothed_mi
            shown = "none" if smoothed is None else f"{smoothed:.4g}"
            if cfg.fallback_epoch is not None and epoch >= cfg.fallback_epoch:
                self._switch(step, epoch, f"fallback: MI did not settle below {cfg.mi_threshold:g} "
                                          f"by epoch {cfg.fallback_epoch} (smoothed MI {shown})")
            elif cfg.fallback_step is not None and step >= cfg.fallback_step:
                self._switch(step, epoch, f"fallback: MI did not settle below {cfg.mi_threshold:g} "
                                          f"by step {cfg.fallback_step} (smoothed MI {shown})")

    def start_epoch(self, step: int, epoch: int) -> None:
        """Apply the epoch-based rules (fixed schedule, fallback) at the start of ``epoch``."""
        self._check_step(step, epoch)
        if not self.switched:
            self._check_schedule(step, epoch)

    def observe(self, step: int, epoch: int, mi_layer1: float) -> None:
        """Feed one layer-1 MI estimate (averaged over ranks); may switch layer 2 on.

        A non-finite value is not added to the window and breaks the run of
        observations below the threshold.
        """
        self._check_step(step, epoch)
        if self.switched:
            return
        cfg = self.config
        if cfg.mode == "mi":
            value = float(mi_layer1)
            if math.isfinite(value):
                self._window.append((step, value))
            self._window = [(s, v) for s, v in self._window if s > step - cfg.window_steps]
            smoothed = self.smoothed_mi
            if smoothed is not None:
                self._peak = smoothed if self._peak is None else max(self._peak, smoothed)
            bound = self.threshold
            armed = epoch >= cfg.mi_min_epoch
            if armed and math.isfinite(value) and smoothed is not None and smoothed < bound:
                if self._below_since is None:
                    self._below_since = step
            else:
                self._below_since = None
            if self._below_since is not None and step - self._below_since >= cfg.patience_steps:
                self._switch(step, epoch, f"MI trigger: smoothed layer-1 MI {smoothed:.4g} < {bound:.4g} "
                                          f"since step {self._below_since} ({step - self._below_since} steps "
                                          f">= patience {cfg.patience_steps})")
                return
        self._check_schedule(step, epoch)

    def state_dict(self) -> dict:
        """JSON-serialisable state; with :meth:`load_state_dict` the decisions resume exactly."""
        return {
            "version": _STATE_VERSION,
            "mode": self.config.mode,
            "window": [[s, v] for s, v in self._window],
            "below_since": self._below_since,
            "peak": self._peak,
            "last_step": self._last_step,
            "switch": self.switch_record,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the configuration stays the one given at construction."""
        expected = {"version", "mode", "window", "below_since", "last_step", "switch"}
        if isinstance(state, dict) and state.get("version") == _STATE_VERSION:
            expected = expected | {"peak"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise SrcidError(f"warm start state: expected keys {sorted(expected)}, got {got}")
        if state["version"] not in (1, _STATE_VERSION):
            raise SrcidError(f"warm start state: version {state['version']} is not {_STATE_VERSION}")
        if state["mode"] != self.config.mode:
            raise SrcidError(f"warm start state: saved with mode {state['mode']!r}, "
                             f"the configuration says {self.config.mode!r}")
        try:
            self._window = [(int(s), float(v)) for s, v in state["window"]]
        except (TypeError, ValueError):
            raise SrcidError("warm start state: 'window' must be a list of [step, value] pairs") from None
        self._below_since = None if state["below_since"] is None else int(state["below_since"])
        peak = state.get("peak")
        self._peak = None if peak is None else float(peak)
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        switch = state["switch"]
        if switch is not None and (not isinstance(switch, dict)
                                   or set(switch) != {"step", "epoch", "smoothed_mi", "reason"}):
            raise SrcidError("warm start state: 'switch' must be null or {step, epoch, smoothed_mi, reason}")
        self._record = dict(switch) if switch is not None else None
