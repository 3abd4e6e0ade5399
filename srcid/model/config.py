"""Model configuration: every size and hyperparameter, with presets.

Input sizes are not configuration: they come from the dataset manifest and are
passed to :func:`srcid.model.variants.build_model`. ``docs/METHOD.md`` explains
each option where the paper and the authors' code differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from srcid.errors import SrcidError

PRESETS = ("tiny", "small", "paper")  # the one list of presets (the trainer, the study and their help)
DEFAULT_SEED = 43  # the default training seed: the trainer's weights and data order, and the model's own draws
CLUB_ESTIMATORS = ("all_pairs", "sampled")
CODEBOOK_INITS = ("kmeans", "sample", "uniform")
DEAD_CODE_RULES = ("ema", "steps")
DEAD_CODE_SOURCES = ("batch", "far", "active_code")
VIDEO_SPECIFIC = ("head", "map")
TEXT_TARGETS = ("lstm", "features")
LAYER2_INPUT_NORMS = ("none", "layer")
# Keys added after models were first saved, with the value a saved config that lacks them meant: the behaviour of
# the code that wrote it (srcid.config.with_absent_keys). Today's default of each is given by ModelConfig.
ABSENT_MEANS = {
    "normalize_inputs": False, "quantizer.init": "uniform", "quantizer.dead_code": "steps",
    "quantizer.dead_code_source": "active_code", "video_specific": "head", "text_target": "lstm",
    "layer2_detach_target": False, "layer2_input_norm": "none", "layer2_center": False, "club.logvar_range": 1.0,
}


@dataclass
class TransformerConfig:
    """The post-norm Transformer of every general encoder."""

    layers: int = 2
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1


@dataclass
class QuantizerConfig:
    """Codebook, EMA/MMEMA, commitment, dead codes, and the RVQ/FSQ baselines."""

    codebook_size: int = 400
    beta: float = 0.25  # commitment cost
    commit_own: float = 2.0  # MMEMA commitment: own * beta * ||z_m - sg(q_m)||^2
    commit_cross: float = 0.5  # + cross * beta * ||z_m - sg(q_n)||^2 per other modality n
    decay: float = 0.99
    eps: float = 1e-5
    mmema_own: float = 0.5  # own share of the mixed EMA vector; the rest is split evenly over the others
    # Codebook initialisation: "kmeans" (k-means on the first training batch's general features, every
    # modality and rank pooled), "sample" (rows of that batch), "uniform" (U(+-1/L), the authors' code).
    init: str = "kmeans"
    kmeans_iters: int = 10
    # Dead codes: "ema" (a code whose EMA cluster size falls below dead_code_threshold x the mean cluster
    # size) or "steps" (unused by every modality for more than dead_code_steps steps, the authors' code).
    dead_code: str = "ema"
    dead_code_threshold: float = 0.1
    dead_code_steps: int = 300
    # What a dead code becomes: "batch" (a random general feature of the step, every rank's pooled), "far" (a
    # feature of the step drawn with probability proportional to its squared distance from its nearest code,
    # k-means++ seeding) or "active_code" (a code used within active_window steps plus uniform noise in
    # +-dead_code_noise, the authors')
    dead_code_source: str = "far"
    active_window: int = 100
    dead_code_noise: float = 1.0 / 1024.0
    rvq_stages: int = 2  # used by the RVQ variants (the variant name sets it)
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)


@dataclass
class CPCConfig:
    """Cross-modal contrastive predictive coding."""

    lstm_layers: int = 1  # paper: single-layer LSTMs; authors' code: 2
    context: int = 256  # LSTM hidden size
    horizon: int = 1  # R, steps predicted ahead
    min_start: int = 1  # smallest context time step t
    cross_weight: float = 1.0
    self_weight: float = 0.1


@dataclass
class ClubConfig:
    """CLUB mutual-information upper bound and its q_theta networks."""

    hidden: int = 128
    hidden_layers: int = 3
    estimator: str = "all_pairs"  # "all_pairs" (paper Eq. 6) or "sampled" (authors' CLUBSample)
    inner_steps: int = 5
    lr: float = 1e-3
    # Standardise y per dimension with the batch's (detached) mean and std before q_theta: MI does not change
    # under that rescaling, but q_theta's std floor (tanh log-variance: std >= e^-1/2) no longer hides a small y.
    standardize_y: bool = False
    # q_theta's log-variance is logvar_range * tanh(.): 1 is the code's (std >= e^-1/2 = 0.61); a wider range
    # (e.g. 6: std >= e^-3 = 0.05) lets q_theta fit a small y without rescaling y, so the gradient to y is unchanged.
    logvar_range: float = 1.0


@dataclass
class LossWeights:
    recon: float = 1.0
    commit: float = 1.0
    cpc: float = 1.0
    cmcm: float = 1.0
    mi: float = 1.0
    mi_layer1: float = 1.0  # per-layer factors on top of ``mi`` (0 switches CLUB off in that layer: Fig. 3's ablation)
    mi_layer2: float = 1.0
    # Paper Eq. 6 and 7 average the CLUB and CPC terms over the K layers (1/K); the two-layer code sums them.
    average_layers: bool = True


@dataclass
class ModelConfig:
    """Every size and hyperparameter of SRCID and its DCID baselines."""

    hidden: int = 256  # D: general features and codes
    specific: int = 256  # audio/text specific output size (layer 1)
    text_lstm_hidden: int = 128  # per direction; the text front end gives 2x this
    text_lstm_layers: int = 2
    text_mask: bool = True  # honour the text mask (BiLSTM per clip length, key padding, masked reconstruction)
    video_conv: int = 2048  # channels of the video specific conv stack (its first conv has half)
    video_se_reduction: int = 8  # squeeze-excite bottleneck: channels // reduction
    # The video specific output (CLUB's y, layer 2's input): "head" (the authors' code: a Linear-ReLU-Linear head
    # on the pooled conv map that only CLUB trains before layer 2 is on) or "map" (the pooled map the decoder reads,
    # the paper's one specific output per modality; docs/METHOD.md says why it is the default)
    video_specific: str = "map"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    cpc: CPCConfig = field(default_factory=CPCConfig)
    club: ClubConfig = field(default_factory=ClubConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    normalize_inputs: bool = True  # standardise each input feature with pretraining-split moments (false: raw, as the authors)
    layer2_run_when_off: bool = True  # run layer 2 (forward and codebook EMA) while its loss weight is 0
    layer2_detach_input: bool = False  # stop layer-2 gradients at layer 1's specific output
    # how layer 2 reads layer 1's specific output (its input, and its target): "none" (as it comes, the paper and the
    # authors' code) or "layer" (each step's vector standardised over its dimensions, no learned scale: layer 1's
    # specific output has whatever scale training gives it, and a small one starves layer 2's codebook)
    layer2_input_norm: str = "none"
    # take the batch mean of layer 2's general features out before quantization (in evaluation the mean over training
    # clips under the final weights): their shared component otherwise grows at the warm-start switch until every
    # feature falls on one code
    layer2_center: bool = True
    # the Transformer dropout of layer 2's general encoders (None: transformer.dropout, as in the authors' code).
    # Layer 2's general features spread little from clip to clip, so its codebook, trained on features with
    # dropout noise, spends codes on that noise and evaluation (no dropout) finds half of them
    layer2_dropout: Optional[float] = None
    # detach layer 2's reconstruction target (layer 1's specific output), keeping the gradient through its input:
    # otherwise layer 1's encoder can shrink the target layer 2 must rebuild
    layer2_detach_target: bool = True
    # layer 1's text reconstruction target: "lstm" (the jointly trained BiLSTM output, the authors' code) or
    # "features" (the input token features, the paper's "reconstruct the input"; real steps only)
    text_target: str = "features"
    check_finite: bool = True  # reject batches holding NaN/Inf (one reduction and one sync per step)
    seed: int = DEFAULT_SEED  # seeds the model's own draws: CPC time step, dead-code resets, CLUB shuffles

    def validate(self) -> "ModelConfig":
        """Raise :class:`SrcidError` naming the first inconsistent value."""
        def need(cond: bool, key: str, what: str):
            if not cond:
                raise SrcidError(f"model config {key}={_get(self, key)!r}: {what}")

        for key in ("hidden", "specific", "text_lstm_hidden", "text_lstm_layers", "video_conv", "video_se_reduction",
                    "transformer.layers", "transformer.heads", "transformer.ffn", "quantizer.codebook_size",
                    "quantizer.dead_code_steps", "quantizer.active_window", "quantizer.rvq_stages", "cpc.lstm_layers",
                    "cpc.context", "cpc.horizon", "cpc.min_start", "club.hidden", "club.hidden_layers"):
            need(isinstance(_get(self, key), int) and _get(self, key) >= 1, key, "must be a positive integer")
        need(self.club.inner_steps >= 0, "club.inner_steps", "must be >= 0")
        need(isinstance(self.club.logvar_range, (int, float)) and 0.0 < self.club.logvar_range <= 20.0,
             "club.logvar_range", "must lie in (0, 20]")
        need(self.hidden % self.transformer.heads == 0, "transformer.heads", f"must divide hidden={self.hidden}")
        need(self.video_conv >= 2 and self.video_conv % 2 == 0, "video_conv", "must be an even integer >= 2")
        need(0.0 <= self.transformer.dropout < 1.0, "transformer.dropout", "must lie in [0, 1)")
        need(self.layer2_dropout is None or 0.0 <= self.layer2_dropout < 1.0, "layer2_dropout",
             "must lie in [0, 1) or be none (transformer.dropout)")
        q = self.quantizer
        need(q.codebook_size >= 2, "quantizer.codebook_size", "must be >= 2")
        need(0.0 < q.decay < 1.0, "quantizer.decay", "must lie in (0, 1)")
        need(q.eps > 0.0, "quantizer.eps", "must be > 0")
        need(0.0 < q.mmema_own <= 1.0, "quantizer.mmema_own", "must lie in (0, 1]")
        for key in ("quantizer.beta", "quantizer.commit_own", "quantizer.commit_cross", "quantizer.dead_code_noise",
                    "cpc.cross_weight", "cpc.self_weight", "club.lr", "weights.recon", "weights.commit", "weights.cpc",
                    "weights.cmcm", "weights.mi", "weights.mi_layer1", "weights.mi_layer2"):
            need(_get(self, key) >= 0.0, key, "must be >= 0")
        need(len(q.fsq_levels) >= 1 and all(isinstance(v, int) and v >= 2 for v in q.fsq_levels),
             "quantizer.fsq_levels", "must be a non-empty list of integers >= 2")
        need(q.init in CODEBOOK_INITS, "quantizer.init", f"choose one of {', '.join(CODEBOOK_INITS)}")
        need(isinstance(q.kmeans_iters, int) and q.kmeans_iters >= 0, "quantizer.kmeans_iters", "must be an integer >= 0")
        need(q.dead_code in DEAD_CODE_RULES, "quantizer.dead_code", f"choose one of {', '.join(DEAD_CODE_RULES)}")
        need(0.0 <= q.dead_code_threshold < 1.0, "quantizer.dead_code_threshold", "must lie in [0, 1)")
        need(q.dead_code_source in DEAD_CODE_SOURCES, "quantizer.dead_code_source",
             f"choose one of {', '.join(DEAD_CODE_SOURCES)}")
        need(self.layer2_input_norm in LAYER2_INPUT_NORMS, "layer2_input_norm",
             f"choose one of {', '.join(LAYER2_INPUT_NORMS)}")
        need(self.text_target in TEXT_TARGETS, "text_target", f"choose one of {', '.join(TEXT_TARGETS)}")
        need(self.video_specific in VIDEO_SPECIFIC, "video_specific", f"choose one of {', '.join(VIDEO_SPECIFIC)}")
        need(self.club.estimator in CLUB_ESTIMATORS, "club.estimator", f"choose one of {', '.join(CLUB_ESTIMATORS)}")
        return self


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _paper() -> ModelConfig:
    return ModelConfig()


def _small() -> ModelConfig:
    return ModelConfig(
        hidden=64, specific=64, text_lstm_hidden=32, video_conv=128,
        transformer=TransformerConfig(layers=2, heads=4, ffn=256, dropout=0.1),
        quantizer=QuantizerConfig(codebook_size=128, fsq_levels=(8, 4, 4)),
        cpc=CPCConfig(context=64),
        club=ClubConfig(hidden=32),
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        hidden=16, specific=16, text_lstm_hidden=8, video_conv=16, video_se_reduction=4,
        transformer=TransformerConfig(layers=2, heads=2, ffn=32, dropout=0.1),
        quantizer=QuantizerConfig(codebook_size=32, dead_code_steps=50, active_window=20, fsq_levels=(4, 4, 2)),
        cpc=CPCConfig(context=16),
        club=ClubConfig(hidden=16),
    )


_BUILDERS = {"paper": _paper, "small": _small, "tiny": _tiny}


def model_config(preset: str = "paper") -> ModelConfig:
    """A fresh :class:`ModelConfig` for ``preset`` (``paper``, ``small`` or ``tiny``)."""
    if preset not in _BUILDERS:
        raise SrcidError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return _BUILDERS[preset]().validate()
