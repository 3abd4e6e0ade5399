"""The model variants by name, and the builder."""
from __future__ import annotations

import dataclasses

from srcid.errors import SrcidError
from srcid.model.config import ModelConfig
from srcid.model.fsq import FSQQuantizer
from srcid.model.rvq import ResidualMMEMAQuantizer
from srcid.model.srcid_model import SrcidModel
from srcid.model.vq import MMEMAQuantizer


@dataclasses.dataclass(frozen=True)
class Variant:
    layers: int
    quantizer: str  # "vq", "rvq" or "fsq"
    stages: int = 0  # RVQ stages (0: from the config's quantizer.rvq_stages)
    summary: str = ""


VARIANTS = {
    "srcid": Variant(2, "vq", summary="SRCID: two layers; layer 2 disentangles layer 1's specific output"),
    "dcid": Variant(1, "vq", summary="DCID: one layer, VQ with MMEMA"),
    "dcid-fsq": Variant(1, "fsq", summary="DCID with FSQ (levels: quantizer.fsq_levels)"),
    "dcid-rvq": Variant(1, "rvq", summary="DCID with RVQ, quantizer.rvq_stages stages"),
    "dcid-rvq2": Variant(1, "rvq", 2, summary="DCID with 2-stage RVQ"),
    "dcid-rvq3": Variant(1, "rvq", 3, summary="DCID with 3-stage RVQ"),
    "dcid-rvq4": Variant(1, "rvq", 4, summary="DCID with 4-stage RVQ"),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise SrcidError(f"unknown model variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def build_model(variant: str, config: ModelConfig, input_shapes: dict) -> SrcidModel:
    """Build a variant for inputs of the given per-clip shapes (``{modality: shape}``, from the manifest)."""
    spec = get_variant(variant)
    config.validate()
    q = config.quantizer

    def make_quantizer(layer_index: int, modalities: tuple, dim: int):
        if spec.quantizer == "vq":
            return MMEMAQuantizer(modalities, dim, q, seed=config.seed, stream=layer_index)
        if spec.quantizer == "rvq":
            return ResidualMMEMAQuantizer(modalities, dim, q, stages=spec.stages or q.rvq_stages, seed=config.seed, stream=layer_index)
        return FSQQuantizer(modalities, dim, q.fsq_levels)

    return SrcidModel(variant, config, input_shapes, num_layers=spec.layers, make_quantizer=make_quantizer)


def build_model_from_manifest(variant: str, config: ModelConfig, manifest) -> SrcidModel:
    """:func:`build_model` with the input shapes of a :class:`~srcid.data.manifest.Manifest`."""
    return build_model(variant, config, {m: spec.shape for m, spec in manifest.modalities.items()})
