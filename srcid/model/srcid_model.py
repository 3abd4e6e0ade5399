"""The SRCID model (and its one-layer DCID baselines): text front end, layers, inference."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from srcid.errors import SrcidError
from srcid.model.config import ModelConfig
from srcid.model.centre import calibrate_centres
from srcid.model.encoders import TextFrontEnd
from srcid.model.inputs import check_batch, check_features, fit_steps, parse_input_shapes
from srcid.model.layer import DisentangleLayer, LayerOutput
from srcid.model.losses import club_key, model_loss
from srcid.model.normalize import InputNormalizer, fit_moments
from srcid.model.randomness import CPC_STREAM, StepCounter, generator

LAYER2_NORM_EPS = 1e-6  # small against the variance of a specific output of std 0.01


def layer2_view(y: torch.Tensor, norm: str) -> torch.Tensor:
    """Layer 1's specific output as layer 2 reads it (``model.layer2_input_norm``): as it comes (``"none"``) or each
    step's vector standardised over its dimensions without a learned scale (``"layer"``; a constant vector gives 0)."""
    if norm == "layer":
        return F.layer_norm(y, y.shape[-1:], eps=LAYER2_NORM_EPS)
    return y


@dataclasses.dataclass
class ModelOutput:
    """The forward pass of a batch: one :class:`LayerOutput` per layer that ran."""

    layers: list[LayerOutput]  # one per layer that ran
    modalities: tuple
    step: int  # the model's training step when this output was computed

    @property
    def indices(self) -> list:
        """Per layer, ``{modality: indices}``."""
        return [layer.indices for layer in self.layers]


class Encoded(NamedTuple):
    indices: list  # per requested layer: [B, T] (RVQ: [B, T, S])
    quantized: list  # per requested layer: [B, T, D]


class SrcidModel(nn.Module):
    """``layers`` disentanglement layers over the modalities of ``input_shapes``.

    Layer 1 reads the features (text through a BiLSTM front end); layer 2
    reads layer 1's specific outputs (paper Eq. 2). Training-mode ``forward``
    updates the codebooks; ``loss`` turns an output into ``(total, terms)``.
    """

    def __init__(self, variant: str, config: ModelConfig, input_shapes: dict, *, num_layers: int,
                 make_quantizer: Callable[[int, tuple, int], nn.Module]):
        super().__init__()
        config.validate()
        self.variant, self.config = variant, config
        self.specs, self.steps_per_clip = parse_input_shapes(input_shapes)
        self.input_shapes = {m: spec.shape for m, spec in self.specs.items()}
        self.modalities = tuple(self.specs)
        # always built (so every state dict has its buffers); the identity until fitted
        self.normalizer = InputNormalizer({m: spec.shape[-1] for m, spec in self.specs.items()})
        low, high = config.cpc.min_start, self.steps_per_clip - config.cpc.horizon - 1
        if high < low:
            raise SrcidError(
                f"cpc.horizon={config.cpc.horizon} with cpc.min_start={config.cpc.min_start} needs clips of at least "
                f"{low + config.cpc.horizon + 1} steps; the inputs have {self.steps_per_clip}"
            )
        self.text_frontend = None
        shapes = {}
        for m, spec in self.specs.items():
            if m == "text":
                self.text_frontend = TextFrontEnd(spec.shape[-1], config.text_lstm_hidden, config.text_lstm_layers)
                shapes[m] = (self.text_frontend.out_dim,)
            else:
                shapes[m] = spec.feature_shape
        text_features = config.text_target == "features" and "text" in self.specs
        layers = [DisentangleLayer(shapes, config, make_quantizer(0, self.modalities, config.hidden), specific_dim=config.specific,
                                   target_dims={"text": self.specs["text"].shape[-1]} if text_features else None)]
        for k in range(1, num_layers):
            shapes = {m: (layers[-1].specific_dims[m],) for m in self.modalities}
            layers.append(DisentangleLayer(shapes, config, make_quantizer(k, self.modalities, config.hidden), specific_dim=None,
                                           centre_general=config.layer2_center, general_dropout=config.layer2_dropout))
        self.layers = nn.ModuleList(layers)
        self.steps = StepCounter()
        self.batch_gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    # ------------------------------------------------------------------ training

    def forward(self, batch, *, num_layers: Optional[int] = None) -> ModelOutput:
        """Run ``num_layers`` layers (default all) on a :class:`~srcid.data.batch.Batch`.

        In training mode the codebooks are EMA-updated and the step advances.
        """
        check_batch(batch, self.specs, check_finite=self.config.check_finite, variant=self.variant)
        inputs, masks, features = self._prepare(batch.features, batch.masks)
        update = self.training
        step = self.steps.value
        outputs = []
        config = self.config
        for k, layer in enumerate(self.layers[: num_layers or len(self.layers)]):
            targets = None
            if k == 0 and config.text_target == "features" and "text" in features:
                targets = {**inputs, "text": features["text"]}
            if k > 0:
                previous = {m: layer2_view(y, config.layer2_input_norm) for m, y in outputs[-1].specific.items()}
                inputs = {m: y.detach() if config.layer2_detach_input else y for m, y in previous.items()}
                if config.layer2_detach_target:
                    targets = {m: y.detach() for m, y in previous.items()}
            outputs.append(layer(inputs, masks, update=update, cpc_step=self.cpc_step(step, k), gather=self.batch_gather,
                                 targets=targets))
        if update:
            self.steps.advance()
        return ModelOutput(layers=outputs, modalities=self.modalities, step=step)

    def cpc_step(self, step: int, layer_index: int) -> int:
        """The context time step ``t`` of a layer's CPC at a training step, drawn from the seeded stream."""
        low, high = self.config.cpc.min_start, self.steps_per_clip - self.config.cpc.horizon - 1
        gen = generator(self.config.seed, step, CPC_STREAM, layer_index)
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    def loss(self, output: ModelOutput, mi_estimator, *, layer2_weight: float = 1.0) -> tuple:
        """``(total, terms)`` of an output; see :func:`srcid.model.losses.model_loss`."""
        return model_loss(self, output, mi_estimator, layer2_weight=layer2_weight)

    def club_dims(self) -> dict:
        """``{club key: (x_dim, y_dim)}`` for every layer and modality."""
        return {club_key(k + 1, m): (self.config.hidden, layer.specific_dims[m])
                for k, layer in enumerate(self.layers) for m in layer.modalities}

    def club_pairs(self, output: ModelOutput) -> dict:
        """``{club key: (x, y)}``: quantized general sequence and specific output of each layer that ran
        (detached, over the global batch under data parallelism, so every rank fits the same q_theta)."""
        gather = self.gather
        return {club_key(k + 1, m): (gather(out.quantized[m].detach()), gather(out.specific[m].detach()))
                for k, out in enumerate(output.layers) for m in out.quantized}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` ``[B, ...]`` with the batch dimension concatenated over data-parallel ranks."""
        return tensor if self.batch_gather is None else self.batch_gather(tensor)

    def quantizers(self) -> list:
        return [layer.quantizer for layer in self.layers]

    def set_batch_gather(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Install the data-parallel batch gather used by the batch-coupled losses (CPC, CMCM, CLUB).

        ``fn(tensor)`` concatenates the batch dimension over ranks, differentiably
        (:class:`srcid.train.distributed.BatchGather`); ``None``: single process.
        """
        self.batch_gather = fn

    def set_reduce_stats(self, fn: Optional[Callable[[torch.Tensor], None]]) -> None:
        """Install the data-parallel statistics reduction on every quantizer (``None``: single process)."""
        for q in self.quantizers():
            q.reduce_stats = fn

    @torch.no_grad()
    def fit_input_stats(self, batches, *, reduce=None) -> bool:
        """Fit the input normaliser on ``batches`` (the pretraining split); returns whether it was fitted.

        Does nothing (returns False) with ``normalize_inputs=false``. ``reduce``
        sums the float64 moments across data-parallel ranks in place, so every
        rank ends with the same statistics.
        """
        if not self.config.normalize_inputs:
            return False
        moments = fit_moments(self.normalizer.dims, batches, reduce=reduce)
        self.normalizer.set_moments(moments)
        return True

    def calibrate_centres(self, batches, *, reduce=None) -> dict:
        """Set the layer-2 centre's running mean to the mean over ``batches`` (the pretraining split) under the
        current weights; the trainer calls it after the last step. Nothing to do (``{}``) without
        ``layer2_center``. ``reduce`` sums across ranks as in :func:`srcid.model.centre.calibrate_centres`."""
        return calibrate_centres(self, batches, reduce=reduce)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def encode(self, features: torch.Tensor, modality: str, *, mask: Optional[torch.Tensor] = None, layers=(1,)) -> Encoded:
        """Code indices and quantized general sequences of one modality, per requested layer.

        Runs in eval mode without codebook updates (the module's mode is restored).
        ``layers=(1,)`` is the paper's "only1"; ``(1, 2)`` adds layer 2.
        """
        if modality not in self.specs:
            raise SrcidError(f"modality {modality!r}: this {self.variant} model has {', '.join(self.modalities)}")
        layers = tuple(layers)
        if not layers or any(k not in range(1, len(self.layers) + 1) for k in layers):
            raise SrcidError(f"layers {layers}: this {self.variant} model has layer(s) {tuple(range(1, len(self.layers) + 1))}")
        check_features(features, self.specs[modality])
        if mask is not None and tuple(mask.shape) != tuple(features.shape[:2]):
            raise SrcidError(f"{modality} mask: expected shape {list(features.shape[:2])}, got {list(mask.shape)}")
        was_training = self.training
        self.eval()
        try:
            inputs, masks, _ = self._prepare({modality: features}, {} if mask is None else {modality: mask})
            x, m_mask = inputs[modality], masks.get(modality)
            collected = {}
            for k in range(1, max(layers) + 1):
                idx, q, y = self.layers[k - 1].encode(x, modality, m_mask, specific=k < max(layers))
                collected[k] = (idx, q)
                x = y
        finally:
            self.train(was_training)
        return Encoded([collected[k][0] for k in layers], [collected[k][1] for k in layers])

    # ------------------------------------------------------------------ helpers

    def _prepare(self, features: dict, batch_masks: dict) -> tuple:
        """``(inputs, masks, features)``: layer-1 inputs (standardised when the normaliser is fitted, in the
        parameters' dtype), the masks to honour, and the features before any front end: text is fitted to ``T``
        steps (``features``) and run through the front end (``inputs``)."""
        inputs, masks, prepared = {}, {}, {}
        dtype = self.layers[0].general[self.modalities[0]].temporal.proj.weight.dtype
        for m, x in features.items():
            if m not in self.specs:
                continue
            x = self.normalizer(m, x, batch_masks.get(m) if m == "text" else None).to(dtype)
            if m == "text":
                x, mask = fit_steps(x, batch_masks.get(m), self.steps_per_clip)
                if not self.config.text_mask:
                    mask = torch.ones_like(mask)
                else:
                    masks[m] = mask
                prepared[m] = x * mask[:, :, None].to(x.dtype)
                x = self.text_frontend(x, mask)
            else:
                prepared[m] = x
            inputs[m] = x
        return inputs, masks, prepared
