"""What a trained model's representations look like: code usage, the spread of the specific outputs, dead
units, reconstruction.

A collapse check, flagging each kind of collapse per layer and modality:

* **collapsed codebook**: the general sequence is quantized to at most a
  handful of codes (``collapse_codes``, default 2) over every clip and step;
  the discrete representation then tells the clips apart by nothing.
* **dead y**: a specific output ``y`` none of whose dimensions varies across
  clips and steps by more than a small fraction (``live_rel``, default 1%) of
  the spread of the layer's reconstruction target (``y`` is computed from that
  target, so the threshold follows the scale of what the layer reads). A dead
  ``y`` carries nothing: the CLUB estimate of its mutual information with the
  general code is zero however well the disentanglement worked, and layer 2,
  which reads ``y``, has nothing left to quantize.
* **dead units**: the fraction of the hidden ReLU units feeding ``y`` that
  never fire on any real step read (vector inputs: ``y = relu(linear(x))``'s
  own units; video grids: the hidden units of the ``Linear -> ReLU -> Linear``
  head, or with ``video_specific="map"`` the channels of the pooled map, a
  channel firing where any grid cell does). They are read with forward hooks,
  so the model is not changed.

Where the clips carry classes, each layer and modality also gets the class
read back on held-out steps from its codes and from the general features they
quantize (:mod:`srcid.eval.code_classes`): many codes in use do not mean the
code keeps the class.

A learned reconstruction target (text: the BiLSTM output) can shrink until its
reconstruction error is small for no merit; the error relative to the
target's variance shows it.

Statistics are accumulated in float64 over every real step of the clips read
(padded text steps are left out), with the model in eval mode: no codebook
update, no step counted. :func:`plot_code_usage` draws the code-usage
histograms (one subplot per layer and modality).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from srcid.data.batch import fitting_clips, step_labels
from srcid.eval.code_classes import ClassReadingAccumulator
from srcid.model.encoders import VectorSpecificEncoder
from srcid.model.quantizers import codebook_size

# a specific-output dimension counts as live when its std over clips and steps exceeds this fraction of the
# spread of the layer's reconstruction target (the mean per-feature std, ``target_std``)
LIVE_REL = 1e-2
# a layer and modality using at most this many distinct codes (RVQ: code tuples) has a collapsed codebook
COLLAPSE_CODES = 2
# a target whose mean per-feature variance is at most this does not vary: nothing computed from it can be live,
# and the error relative to its variance is undefined
FLAT_VARIANCE = 1e-12


@dataclasses.dataclass
class RepresentationStats:
    """One layer and modality."""

    layer: int
    modality: str
    steps: int  # real (clip, time) steps the numbers are over
    distinct_codes: int  # different code indices (an RVQ tuple counts as one code)
    code_perplexity: float  # exp(entropy) of the code frequencies
    specific_dim: int
    specific_std: float  # std of y over steps, averaged over its dimensions
    specific_live_dims: int  # dimensions of y with std > live_threshold
    target_std: float  # std of the reconstruction target over steps, averaged over its features
    recon_mse: float
    recon_relative: Optional[float]  # recon_mse / mean target variance; None where the target does not vary
    codebook_size: Optional[int] = None  # codes of the codebook (RVQ: of each stage; FSQ: prod(levels)); None: unknown
    stage_distinct_codes: list = dataclasses.field(default_factory=list)  # distinct codes of each RVQ stage ([n] else)
    codebook_fraction: Optional[float] = None  # distinct codes / codebook_size (RVQ: the mean over stages)
    collapsed_codebook: bool = False  # distinct_codes <= the collapse threshold
    live_threshold: float = 0.0  # the std a dimension of y had to exceed to count as live
    hidden_units: Optional[int] = None  # hidden ReLU units feeding y; None where the specific encoder has none
    dead_units: Optional[int] = None  # of those, the units that never fired (output > 0) on a real step
    dead_unit_fraction: Optional[float] = None  # dead_units / hidden_units
    # the class read back on held-out labelled steps (srcid.eval.code_classes); None without two labelled classes
    labelled_steps: Optional[int] = None
    classes: Optional[int] = None  # distinct classes on the labelled steps
    class_from_codes: Optional[float] = None  # accuracy of each code's most frequent class
    class_from_general: Optional[float] = None  # accuracy of the nearest class mean of the general features
    class_most_frequent: Optional[float] = None  # accuracy of the most frequent class: reading nothing
    # how often each distinct code (RVQ: tuple) was used, most used first (the histogram; not written to JSON)
    code_counts: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def dead_specific(self) -> bool:
        """No dimension of y is live."""
        return self.specific_live_dims == 0

    @property
    def collapsed(self) -> bool:
        """The older name of :attr:`dead_specific` (the JSON field ``collapsed`` keeps it)."""
        return self.dead_specific

    @property
    def flags(self) -> list:
        """The kinds of collapse found: ``collapsed codebook``, ``dead y``."""
        return [name for name, on in (("collapsed codebook", self.collapsed_codebook), ("dead y", self.dead_specific))
                if on]

    def to_json(self) -> dict:
        """Every field but ``code_counts``, plus ``dead_specific``, ``collapsed`` (the same) and ``flags``."""
        data = dataclasses.asdict(self)
        del data["code_counts"]
        return dict(data, dead_specific=self.dead_specific, collapsed=self.collapsed, flags=self.flags)


class _Moments:
    """Running count, sum and sum of squares per feature (float64), shifted by the first row seen.

    The shift keeps the variance of a feature that does not vary exactly 0 (and accurate when the mean is
    large next to the spread).
    """

    def __init__(self):
        self.count, self.shift, self.sum, self.sum_sq = 0, None, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if rows.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = rows[0].clone()
        rows = rows - self.shift
        s, sq = rows.sum(0), (rows * rows).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += rows.shape[0]

    def variance(self) -> torch.Tensor:
        """Population variance per feature."""
        mean = self.sum / self.count
        return (self.sum_sq / self.count - mean * mean).clamp_min(0.0)


class _Accumulator:
    def __init__(self):
        self.specific, self.target = _Moments(), _Moments()
        self.squared_error, self.codes = 0.0, collections.Counter()
        self.fired: Optional[torch.Tensor] = None  # [hidden units] bool: fired on some real step
        self.units_known = True  # False once a step came without (alignable) hidden activations
        self.classes = ClassReadingAccumulator()

    def add(self, y, target, reconstruction, indices) -> None:
        self.specific.add(y)
        self.target.add(target)
        self.squared_error += float(((reconstruction.to(torch.float64) - target.to(torch.float64)) ** 2).sum())
        keys = indices.reshape(indices.shape[0], -1).tolist()
        self.codes.update(tuple(k) for k in keys)

    def add_hidden(self, rows: Optional[torch.Tensor]) -> None:
        """Hidden activations ``[real steps, units]`` of one batch (``None``: not available)."""
        if rows is None:
            self.units_known = False
            return
        fired = (rows > 0).any(0)
        if self.fired is not None and self.fired.shape != fired.shape:
            self.units_known = False
            return
        self.fired = fired if self.fired is None else self.fired | fired

    def result(self, layer: int, modality: str, *, live_rel: float, live_std: Optional[float],
               collapse_codes: int, codebook_size: Optional[int]) -> RepresentationStats:
        y_std = self.specific.variance().sqrt()
        t_var = self.target.variance()
        features = t_var.numel()
        mse = self.squared_error / (self.target.count * features)
        mean_var = float(t_var.mean())
        target_std = float(t_var.sqrt().mean())
        flat = mean_var <= FLAT_VARIANCE
        if live_std is not None:
            threshold, live = live_std, int((y_std > live_std).sum())
        else:
            # y is computed from the target: a target that does not vary leaves nothing live, whatever rounding says
            threshold = live_rel * target_std
            live = 0 if flat else int((y_std > threshold).sum())
        total = sum(self.codes.values())
        entropy = -sum(c / total * math.log(c / total) for c in self.codes.values())
        stages = len(next(iter(self.codes))) if self.codes else 1
        stage_distinct = [len({key[s] for key in self.codes}) for s in range(stages)]
        fraction = None
        if codebook_size:
            fraction = sum(stage_distinct) / (len(stage_distinct) * codebook_size)
        units = dead = dead_fraction = None
        if self.units_known and self.fired is not None and self.fired.numel() > 0:
            units = int(self.fired.numel())
            dead = int((~self.fired).sum())
            dead_fraction = dead / units
        reading = self.classes.result()
        return RepresentationStats(
            layer=layer, modality=modality, steps=self.specific.count, distinct_codes=len(self.codes),
            code_perplexity=math.exp(entropy), specific_dim=y_std.numel(), specific_std=float(y_std.mean()),
            specific_live_dims=live, target_std=target_std,
            recon_mse=mse, recon_relative=None if flat else mse / mean_var,
            codebook_size=codebook_size, stage_distinct_codes=stage_distinct, codebook_fraction=fraction,
            collapsed_codebook=len(self.codes) <= collapse_codes, live_threshold=float(threshold),
            hidden_units=units, dead_units=dead, dead_unit_fraction=dead_fraction,
            labelled_steps=None if reading is None else reading.labelled_steps,
            classes=None if reading is None else reading.classes,
            class_from_codes=None if reading is None else reading.from_codes,
            class_from_general=None if reading is None else reading.from_general,
            class_most_frequent=None if reading is None else reading.most_frequent,
            code_counts=sorted(self.codes.values(), reverse=True),
        )


def _rows(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, ...] -> [real steps, features]``."""
    flat = t.reshape(t.shape[0] * t.shape[1], -1)
    return flat if keep is None else flat[keep.reshape(-1)]


def hidden_relu_module(encoder: nn.Module) -> Optional[nn.Module]:
    """The module whose output ``> 0`` marks the firing of the hidden ReLU units that feed a specific encoder's y.

    :class:`~srcid.model.encoders.VectorSpecificEncoder` (``y = relu(linear(x))``): its ``linear`` (a unit
    fires when its pre-activation is positive); an encoder with a ``head`` ``nn.Sequential`` holding a ReLU
    before its last module (:class:`~srcid.model.encoders.VideoSpecificEncoder`: ``Linear -> ReLU -> Linear``):
    that ReLU; a video encoder without a head (``video_specific="map"``): its residual stack, whose ReLU'd
    channels y pools. ``None`` for anything else.
    """
    if isinstance(encoder, VectorSpecificEncoder) and isinstance(getattr(encoder, "linear", None), nn.Linear):
        return encoder.linear
    head = getattr(encoder, "head", None)
    convs = getattr(encoder, "convs", None)
    if head is None and isinstance(convs, nn.Sequential) and len(convs):
        return convs[-1]  # video "map": y pools the residual stack's ReLU output; a channel fires if any cell > 0
    if isinstance(head, nn.Sequential):
        relus = [module for module in list(head)[:-1] if isinstance(module, nn.ReLU)]
        if relus:
            return relus[-1]
    return None


def _hidden_rows(activation: Optional[torch.Tensor], shape: tuple, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Hidden activations ``[B*T rows, units]`` as ``[real steps, units]``; None when they cannot be aligned."""
    if activation is None or activation.dim() < 1:
        return None
    rows = activation.detach().reshape(-1, activation.shape[-1])
    if rows.shape[0] != shape[0] * shape[1]:
        return None
    return rows if keep is None else rows[keep.reshape(-1)]


@torch.no_grad()
def representation_stats(model, batches: Iterable, *, live_rel: float = LIVE_REL, live_std: Optional[float] = None,
                         collapse_codes: int = COLLAPSE_CODES) -> list:
    """:class:`RepresentationStats` per layer and modality of ``model`` over ``batches`` (layer-major order).

    A dimension of y is live when its std exceeds ``live_rel`` times the layer's ``target_std``, or, when
    ``live_std`` is given, that absolute std. A layer and modality with at most ``collapse_codes`` distinct
    codes has a collapsed codebook.
    """
    was_training = model.training
    model.eval()
    accumulators: dict = {}
    captured: dict = {}
    handles = []

    def capture(key):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                captured[key] = None
            else:  # a conv map [rows, channels, h, w]: a channel fires where any of its cells does
                captured[key] = (output.amax(dim=(2, 3)) if output.dim() == 4 else output).detach()
        return hook

    hooked = set()
    try:
        for k, layer in enumerate(model.layers, start=1):
            for m, encoder in layer.specific.items():
                module = hidden_relu_module(encoder)
                if module is not None:
                    handles.append(module.register_forward_hook(capture((k, m))))
                    hooked.add((k, m))
        for batch in batches:
            captured.clear()
            output = model(batch)
            labels = getattr(batch, "labels", None) if hasattr(batch, "keys") else None
            for k, layer in enumerate(output.layers, start=1):
                for m in output.modalities:
                    keep = layer.masks.get(m)
                    acc = accumulators.setdefault((k, m), _Accumulator())
                    indices = _rows(layer.indices[m], keep)
                    acc.add(_rows(layer.specific[m], keep), _rows(layer.targets[m], keep),
                            _rows(layer.reconstructions[m], keep), indices)
                    if labels is not None:
                        b, t = layer.indices[m].shape[:2]
                        classes = step_labels(labels, getattr(batch, "segments", {}).get(m), t)
                        fit = fitting_clips(batch.keys).to(classes.device).unsqueeze(1).expand(b, t)
                        acc.classes.add(_rows(layer.general[m], keep), indices,
                                        _rows(classes, keep).reshape(-1), _rows(fit, keep).reshape(-1))
                    if (k, m) in hooked:
                        acc.add_hidden(_hidden_rows(captured.get((k, m)), tuple(layer.indices[m].shape[:2]), keep))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    sizes = {k: codebook_size(getattr(layer, "quantizer", None)) for k, layer in enumerate(model.layers, start=1)}
    return [acc.result(k, m, live_rel=live_rel, live_std=live_std, collapse_codes=collapse_codes,
                       codebook_size=sizes.get(k))
            for (k, m), acc in accumulators.items()]


def _number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _codes(s: RepresentationStats) -> str:
    if len(s.stage_distinct_codes) > 1:  # RVQ: tuples, then each stage's codes
        return f"{s.distinct_codes} ({' + '.join(map(str, s.stage_distinct_codes))} per stage)"
    return str(s.distinct_codes)


def _threshold(live_rel: float, live_std: Optional[float]) -> str:
    return f"std > {live_std:g}" if live_std is not None else f"std > {live_rel:g} x target std"


def to_markdown(stats: list, live_rel: float = LIVE_REL, live_std: Optional[float] = None) -> str:
    """The statistics as a markdown table; where clips carry classes, a second table: the class read back."""
    lines = [
        f"| layer | modality | distinct codes | codebook used | code perplexity | y dims live ({_threshold(live_rel, live_std)}) | "
        "live threshold | y std | target std | dead units | recon MSE | recon MSE / target var | flags |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        size = "" if s.codebook_size is None else f" of {s.codebook_size}"
        dead = "-" if s.hidden_units is None else f"{s.dead_units} / {s.hidden_units} ({_percent(s.dead_unit_fraction)})"
        lines.append(
            f"| {s.layer} | {s.modality} | {_codes(s)} | {_percent(s.codebook_fraction)}{size} | {s.code_perplexity:.1f} | "
            f"{s.specific_live_dims} / {s.specific_dim} | {s.live_threshold:.3g} | {_number(s.specific_std)} | "
            f"{_number(s.target_std)} | {dead} | {_number(s.recon_mse)} | {_number(s.recon_relative, 3)} | "
            f"{', '.join(s.flags) or '-'} |"
        )
    labelled = [s for s in stats if s.classes is not None]
    if labelled:
        lines += [
            "",
            "The class read back on held-out labelled steps (fitted on the clips whose key has an even CRC-32, "
            "scored on the others; srcid/eval/code_classes.py):",
            "",
            "| layer | modality | labelled steps | classes | distinct codes | from the codes | "
            "from the general features (nearest class mean) | most frequent class |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {s.layer} | {s.modality} | {s.labelled_steps} | {s.classes} | {_codes(s)} | "
                  f"{_percent(s.class_from_codes)} | {_percent(s.class_from_general)} | "
                  f"{_percent(s.class_most_frequent)} |" for s in labelled]
    return "\n".join(lines)


def flag_summary(stats: list, *, live_rel: float = LIVE_REL, live_std: Optional[float] = None,
                 collapse_codes: int = COLLAPSE_CODES) -> list:
    """One line per kind of collapse found (none: an empty list)."""
    lines = []
    codebooks = [f"layer {s.layer} {s.modality} ({s.distinct_codes}"
                 + ("" if s.codebook_size is None else f" of {s.codebook_size}") + ")"
                 for s in stats if s.collapsed_codebook]
    if codebooks:
        lines.append(f"collapsed codebooks (at most {collapse_codes} distinct codes): {', '.join(codebooks)}")
    dead = [f"layer {s.layer} {s.modality}" for s in stats if s.dead_specific]
    if dead:
        lines.append(f"dead specific outputs (no dimension of y has {_threshold(live_rel, live_std)}): {', '.join(dead)}")
    return lines


def plot_code_usage(stats: list, path, title: Optional[str] = None) -> Path:
    """Write the code-usage histograms as one PNG at ``path`` (a temporary name first, then renamed).

    One subplot per layer (rows) and modality (columns): the frequency of each code used (RVQ: each code
    tuple), sorted from the most used to the least used, so that a collapsed codebook is one tall bar and an
    evenly used one a flat block. The x axis runs at least to the codebook size (RVQ: one stage's), so the
    unused part of the codebook is the empty space on the right. Each title gives the distinct codes, the codebook
    size and the perplexity.
    """
    # matplotlib is imported here, not at module top: only the --plot output needs it, and it is slow to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    layers = sorted({s.layer for s in stats})
    modalities = list(dict.fromkeys(s.modality for s in stats))
    rows, cols = max(1, len(layers)), max(1, len(modalities))
    figure = Figure(figsize=(4.2 * cols, 3.1 * rows + (0.4 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for s in stats:
        ax = axes[layers.index(s.layer)][modalities.index(s.modality)]
        ax.set_axis_on()
        counts = np.asarray(s.code_counts, dtype=np.float64)
        n = len(counts)
        color = "tab:red" if s.collapsed_codebook else "tab:blue"
        if n:
            freq = counts / counts.sum()
            if n <= 256:
                ax.bar(np.arange(1, n + 1), freq, width=1.0, color=color, edgecolor="none")
            else:
                ax.stairs(freq, np.arange(0.5, n + 1), fill=True, color=color)
        single_stage = len(s.stage_distinct_codes) <= 1
        ax.set_xlim(0.5, max(n, s.codebook_size or 0, 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0.0, 1.05 * (float(counts.max() / counts.sum()) if n else 1.0))
        if single_stage:
            size = "" if s.codebook_size is None else f" / {s.codebook_size}"
            codes = f"{s.distinct_codes}{size} codes"
        else:
            size = "" if s.codebook_size is None else f" of {s.codebook_size}"
            codes = f"{s.distinct_codes} tuples ({'+'.join(map(str, s.stage_distinct_codes))}{size} per stage)"
        flags = f" [{', '.join(s.flags)}]" if s.flags else ""
        ax.set_title(f"layer {s.layer} {s.modality}: {codes}\nperplexity {s.code_perplexity:.1f}{flags}",
                     fontsize=8, color="tab:red" if s.flags else "black")
        ax.set_xlabel("code (" + ("tuple " if not single_stage else "") + "rank, most used first)", fontsize=8)
        ax.set_ylabel("frequency", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
