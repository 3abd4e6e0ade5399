"""One disentanglement layer: general and specific encoders, the quantizer, decoders and CPC."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from srcid.model.centre import GeneralCentre
from srcid.model.config import ModelConfig
from srcid.model.cpc import CrossModalCPC
from srcid.model.decoders import VectorDecoder, VideoDecoder
from srcid.model.encoders import GeneralEncoder, VectorSpecificEncoder, VideoSpecificEncoder
from srcid.model.quantizers import Quantizer


@dataclasses.dataclass
class LayerOutput:
    """Everything one layer computed for a batch (dicts keyed by modality)."""

    targets: dict  # the layer's inputs, which the decoders rebuild ([B, T, ...])
    masks: dict  # [B, T] bool for modalities whose padded steps are left out (text)
    general: dict  # pre-quantization general features z [B, T, D]
    specific: dict  # specific output y [B, T, Dy]: CLUB's y and the next layer's input
    quantized: dict  # straight-through quantized general features [B, T, D]
    indices: dict  # code indices [B, T] ([B, T, S] for RVQ)
    commitment: dict  # scalar commitment loss per modality
    reconstructions: dict  # decoder outputs, shaped like targets
    cpc: torch.Tensor  # cross-modal CPC loss (scalar)
    cpc_step: int  # the context time step t the CPC loss used
    perplexity: dict  # scalar per modality
    codes_used: torch.Tensor  # scalar fraction of codes used this step
    codes: dict  # distinct codes per modality this step (scalar float tensors)
    codebook: Optional[torch.Tensor]  # codebook the step was assigned with (CMCM), None without CMCM


class DisentangleLayer(nn.Module):
    """Phi (general) and Psi (specific) per modality, a shared quantizer, decoders, and CPC.

    ``in_shapes[m]`` is the per-step input shape: ``(D_in,)`` or ``(H, W, C)``.
    ``specific_dim``: output size of vector specific encoders (``None``: keep the
    input size, as layer 2 does). Video grids get the conv-stack specific
    encoder, whose y is a ``C``-d vector. ``target_dims[m]``: the size of a vector modality's reconstruction
    target when it is not the layer's input (text with ``text_target="features"``). ``general_dropout``: the
    general encoders' Transformer dropout (``None``: ``transformer.dropout``).
    """

    def __init__(self, in_shapes: dict, config: ModelConfig, quantizer: Quantizer, *, specific_dim: Optional[int],
                 target_dims: Optional[dict] = None, centre_general: bool = False,
                 general_dropout: Optional[float] = None):
        super().__init__()
        self.modalities = tuple(in_shapes)
        self.in_shapes = dict(in_shapes)
        self.general = nn.ModuleDict()
        self.specific = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        self.specific_dims = {}
        for m, shape in in_shapes.items():
            self.general[m] = GeneralEncoder(shape, config, dropout=general_dropout)
            if len(shape) == 3:
                self.specific[m] = VideoSpecificEncoder(shape[-1], config.video_conv, config.video_specific)
                self.decoders[m] = VideoDecoder(config.hidden, config.video_conv, shape[-1])
            else:
                out = specific_dim or shape[0]
                self.specific[m] = VectorSpecificEncoder(shape[0], out)
                self.decoders[m] = VectorDecoder(config.hidden, out, (target_dims or {}).get(m, shape[0]))
            self.specific_dims[m] = self.specific[m].out_dim
        self.quantizer = quantizer
        # the batch mean of the general features taken out before quantization (model.layer2_center; centre.py)
        self.centre = GeneralCentre(self.modalities, config.hidden) if centre_general else None
        self.cpc = CrossModalCPC(self.modalities, config.hidden, config.cpc)
        self.hidden = config.hidden

    def forward(self, inputs: dict, masks: dict, *, update: bool, cpc_step: int, gather=None,
                targets: Optional[dict] = None) -> LayerOutput:
        """One layer on ``inputs``; the decoders rebuild ``targets`` (default: the inputs)."""
        general = {m: self.general[m](inputs[m], masks.get(m)) for m in self.modalities}
        if self.centre is not None:
            general = self.centre(general, masks, update=update, reduce=self.quantizer._reduce)
        specific, decoder_inputs = {}, {}
        for m in self.modalities:
            specific[m], decoder_inputs[m] = self.specific[m](inputs[m])
        # CPC's negatives are the other clips of the (global, under data parallelism) batch; the quantizer
        # draws its data initialisation and dead-code resets from the same global batch.
        cpc_inputs = {m: gather(z) for m, z in general.items()} if gather is not None else general
        pool = {m: z.detach() for m, z in cpc_inputs.items()} if gather is not None else None
        q = self.quantizer(general, update=update, pool=pool)
        reconstructions = {m: self.decoders[m](q.quantized[m], decoder_inputs[m]) for m in self.modalities}
        return LayerOutput(
            targets=dict(inputs) if targets is None else dict(targets), masks={m: masks[m] for m in self.modalities if m in masks},
            general=general, specific=specific, quantized=q.quantized, indices=q.indices, commitment=q.loss,
            reconstructions=reconstructions, cpc=self.cpc(cpc_inputs, cpc_step), cpc_step=cpc_step,
            perplexity=q.perplexity, codes_used=q.codes_used, codes=q.codes, codebook=q.codebook,
        )

    def encode(self, x: torch.Tensor, modality: str, mask: Optional[torch.Tensor] = None, *, specific: bool = False) -> tuple:
        """``(indices, quantized, specific output or None)`` of one modality, without codebook updates."""
        z = self.general[modality](x, mask)
        if self.centre is not None:
            z = self.centre({modality: z}, {}, update=False)[modality]
        q = self.quantizer({modality: z}, update=False)
        y = self.specific[modality](x)[0] if specific else None
        return q.indices[modality], q.quantized[modality], y
