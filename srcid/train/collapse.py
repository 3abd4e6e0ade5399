"""Collapse seen while training: a layer's codebook shrinking to a few codes, a specific output going flat.

The trainer logs, per layer ``k`` and modality ``m``, ``L<k>/codes/<m>`` (the
distinct codes ``m`` used in the step, over the global batch) and
``L<k>/y_std/<m>`` and ``L<k>/target_std/<m>`` (the spread of the specific
output and of the layer's reconstruction target). At every logging step
:class:`CollapseMonitor` checks two conditions:

* ``codebook``: ``codes <= max(max_codes, max_codes_frac * codebook size)``
  (the size of that layer's codebook, given by the trainer; without it only
  ``max_codes`` counts), so a layer that keeps a handful of codes out of
  hundreds is caught, not only one down to one or two;
* ``specific``: ``y_std < min_y_rel * target_std`` (a y that no longer varies
  carries nothing to CLUB or to layer 2; the bound is relative, so it does not
  depend on the features' scale).

A condition that has held at every logging step for at least ``patience``
steps is reported once (the trainer prints one line and writes a
``collapse`` event to ``events.jsonl``); when it stops holding, a
``collapse_recovered`` event follows.
"""
from __future__ import annotations

import dataclasses
import re

from srcid.errors import SrcidError

KEY = re.compile(r"^L(\d+)/codes/(\w+)$")


@dataclasses.dataclass
class CollapseConfig:
    max_codes: int = 2  # a layer and modality using at most this many codes in a step counts as collapsed
    max_codes_frac: float = 0.05  # ... or at most this fraction of its layer's codebook (0: max_codes only)
    min_y_rel: float = 0.01  # y spread below this fraction of the target's spread counts as flat
    patience: int = 100  # steps a condition must hold before it is reported
    enabled: bool = True

    def validate(self) -> "CollapseConfig":
        if not (isinstance(self.max_codes, int) and self.max_codes >= 0):
            raise SrcidError(f"config key collapse.max_codes={self.max_codes!r}: must be an integer >= 0")
        if not (isinstance(self.max_codes_frac, (int, float)) and 0.0 <= self.max_codes_frac < 1.0):
            raise SrcidError(f"config key collapse.max_codes_frac={self.max_codes_frac!r}: must lie in [0, 1)")
        if not self.min_y_rel >= 0.0:
            raise SrcidError(f"config key collapse.min_y_rel={self.min_y_rel!r}: must be >= 0")
        if not (isinstance(self.patience, int) and self.patience >= 0):
            raise SrcidError(f"config key collapse.patience={self.patience!r}: must be an integer >= 0")
        return self


class CollapseMonitor:
    """Tracks since when each (kind, layer, modality) condition has held; see the module docstring."""

    def __init__(self, config: CollapseConfig, codebook_sizes: dict | None = None):
        """``codebook_sizes``: ``{layer number: codes in its codebook}`` for the relative bound."""
        self.config = config.validate()
        self.codebook_sizes = {int(k): int(v) for k, v in (codebook_sizes or {}).items()}
        self.since: dict = {}  # "kind/layer/modality" -> first logging step of the current run of the condition
        self.reported: set = set()

    def codes_bound(self, layer: int) -> float:
        """Codes per step at or below which ``layer`` counts as collapsed."""
        size = self.codebook_sizes.get(layer)
        relative = self.config.max_codes_frac * size if size else 0.0
        return max(float(self.config.max_codes), relative)

    def _conditions(self, scalars: dict) -> dict:
        """``{"kind/k/m": (holds, value, bound)}`` for every layer and modality in ``scalars``."""
        c, out = self.config, {}
        for key, codes in scalars.items():
            match = KEY.match(key)
            if not match:
                continue
            k, m = match.groups()
            bound = self.codes_bound(int(k))
            out[f"codebook/{k}/{m}"] = (codes <= bound, codes, bound)
            y, target = scalars.get(f"L{k}/y_std/{m}"), scalars.get(f"L{k}/target_std/{m}")
            if y is not None and target is not None:
                bound = c.min_y_rel * target
                out[f"specific/{k}/{m}"] = (y < bound, y, bound)
        return out

    def observe(self, step: int, scalars: dict) -> list:
        """Events due at ``step``: ``[(name, info)]`` with name ``collapse`` or ``collapse_recovered``."""
        if not self.config.enabled:
            return []
        events = []
        for name, (holds, value, bound) in sorted(self._conditions(scalars).items()):
            kind, layer, modality = name.split("/")
            info = {"kind": kind, "layer": int(layer), "modality": modality, "value": float(value), "bound": float(bound)}
            if holds:
                first = self.since.setdefault(name, step)
                if name not in self.reported and step - first >= self.config.patience:
                    self.reported.add(name)
                    events.append(("collapse", {**info, "since": first, "message": describe(info, first)}))
            else:
                self.since.pop(name, None)
                if name in self.reported:
                    self.reported.discard(name)
                    events.append(("collapse_recovered", {**info, "message": describe(info, None)}))
        return events

    def state_dict(self) -> dict:
        return {"since": dict(self.since), "reported": sorted(self.reported)}

    def load_state_dict(self, state: dict) -> None:
        self.since = {k: int(v) for k, v in state.get("since", {}).items()}
        self.reported = set(state.get("reported", []))


def describe(info: dict, since) -> str:
    """One line for the console (``since=None``: the recovery)."""
    where = f"layer {info['layer']} {info['modality']}"
    value, bound = info["value"], info["bound"]
    if since is None:
        if info["kind"] == "codebook":
            return f"{where} recovered: {value:.0f} codes per step"
        return f"{where} recovered: specific output std {value:.2g} (>= {bound:.2g})"
    if info["kind"] == "codebook":
        return f"warning: {where} has used {value:.0f} code(s) per step (<= {bound:.3g}) since step {since}"
    return f"warning: {where} specific output is flat since step {since} (y std {value:.2g} < {bound:.2g})"
