"""The SRCID model and its DCID baselines: encoders, quantizers, losses, variants."""
from srcid.model.club import ClubFitter, MIEstimator, build_mi_fitter
from srcid.model.config import DEFAULT_SEED, PRESETS, ModelConfig, model_config
from srcid.model.srcid_model import Encoded, ModelOutput, SrcidModel
from srcid.model.variants import VARIANTS, build_model, build_model_from_manifest

__all__ = [
    "DEFAULT_SEED", "PRESETS", "ClubFitter", "Encoded", "MIEstimator", "ModelConfig", "ModelOutput", "SrcidModel",
    "VARIANTS", "build_mi_fitter", "build_model", "build_model_from_manifest", "model_config",
]
