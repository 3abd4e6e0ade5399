"""The synthetic default datasets: a seeded generative "world" rendered into feature shards.

One call of :func:`synthesize` builds one :class:`World` from the seed and
writes six dataset folders from it (``pretrain``, ``ave``, ``avvp``,
``ave_avvp``, ``ucf_vgg``, ``retrieval``), so pretraining and downstream sets
share event classes and per-modality renderers. The process, the presets and
what each folder holds are described in docs/SYNTHETIC-DATA.md.

In short: every event class has a latent vector (the sum of a "noun" and a
"verb" latent, which also give its name and its words); every clip has a
latent per 1-second segment (its events with small temporal variation, or a
background scene); each modality renders latents through its own fixed random
two-layer tanh network, together with a per-clip nuisance vector of its own,
plus noise. Video renders a grid of cells: the event sits at a drifting
random location over a spatial background pattern. Text renders the words of
a per-class prompt sentence, one token per word.

Two styles: ``standard`` stops there (every feature about mean 0, std 1, and
classes easy to tell apart); ``realistic`` then passes the rendered features
through :class:`Realism`, which gives them the scales, offsets and sparsity of
real pre-extracted features (VGGish-like log-mel audio, sparse non-negative
VGG19-pool5-like video, small-norm BERT-like text with a shared offset and
outlier dimensions) and adds per-clip nuisance and noise so that classes
overlap more.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from srcid.data.shards import DatasetWriter, write_staged
from srcid.errors import SrcidError

T = 10  # segments (seconds) per clip
DATASETS = ("pretrain", "ave", "avvp", "ave_avvp", "ucf_vgg", "retrieval")
CHUNK = 64  # clips rendered together

NOUNS = (
    "dog", "bell", "engine", "bird", "drum", "horse", "train", "guitar", "baby", "crowd", "siren", "clock",
    "river", "hammer", "violin", "truck", "frog", "owl", "fire", "bus", "saw", "piano", "wind", "cat",
)
VERBS = (
    "ringing", "humming", "rattling", "whistling", "rumbling", "chirping", "buzzing", "thumping", "crackling",
    "droning", "tapping", "howling", "clattering",
)
MAX_CLASSES = len(NOUNS) * len(VERBS)
TEMPLATES = (
    "the sound of a {noun} {verb}",
    "a {noun} {verb}",
    "a {noun} is {verb} nearby",
    "you can hear a {noun} {verb}",
    "there is a {noun} {verb} in the distance",
    "{noun} {verb}",
    "someone records a {noun} {verb} outside",
)
FUNCTION_WORDS = tuple(sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")}))
MAX_TOKENS = max(len(t.split()) for t in TEMPLATES)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one synthetic world and of the datasets rendered from it."""

    name: str
    audio_dim: int
    video_grid: int  # H = W
    video_dim: int
    text_dim: int
    dtype: str
    num_classes: int  # world (pretraining) classes
    ave_classes: int
    avvp_classes: int
    shared_classes: int  # AVE -> AVVP
    ucf_vgg_classes: int
    latent_dim: int
    nuisance_dim: int
    hidden_dim: int
    splits: dict  # dataset -> {split: clips}
    shard_size: int

    def modality_shapes(self) -> dict:
        """Each modality's per-clip shape and dtype as the manifests declare them: ``{m: ([T, ...], dtype)}``."""
        g = self.video_grid
        return {
            "audio": ([T, self.audio_dim], self.dtype),
            "video": ([T, g, g, self.video_dim], self.dtype),
            "text": ([None, self.text_dim], self.dtype),
        }


PRESETS = {
    "tiny": Preset(
        "tiny", audio_dim=16, video_grid=5, video_dim=24, text_dim=32, dtype="float32",
        num_classes=8, ave_classes=6, avvp_classes=6, shared_classes=4, ucf_vgg_classes=4,
        latent_dim=16, nuisance_dim=8, hidden_dim=48,
        splits={
            "pretrain": {"train": 224, "val": 32},
            "ave": {"train": 120, "test": 40},
            "avvp": {"train": 120, "test": 40},
            "ave_avvp": {"train": 100, "test": 60},
            "ucf_vgg": {"ucf_train": 48, "ucf_test": 24, "vgg_train": 48, "vgg_test": 24},
            "retrieval": {"test": 100},
        },
        shard_size=64,
    ),
    "small": Preset(
        "small", audio_dim=64, video_grid=7, video_dim=64, text_dim=96, dtype="float16",
        num_classes=28, ave_classes=16, avvp_classes=14, shared_classes=8, ucf_vgg_classes=10,
        latent_dim=32, nuisance_dim=12, hidden_dim=128,
        splits={
            "pretrain": {"train": 3600, "val": 400},
            "ave": {"train": 800, "test": 200},
            "avvp": {"train": 800, "test": 200},
            "ave_avvp": {"train": 600, "test": 400},
            "ucf_vgg": {"ucf_train": 350, "ucf_test": 150, "vgg_train": 350, "vgg_test": 150},
            "retrieval": {"test": 500},
        },
        shard_size=500,
    ),
    "paper": Preset(
        "paper", audio_dim=128, video_grid=7, video_dim=512, text_dim=768, dtype="float16",
        num_classes=141, ave_classes=28, avvp_classes=25, shared_classes=12, ucf_vgg_classes=16,
        latent_dim=64, nuisance_dim=24, hidden_dim=256,
        splits={
            "pretrain": {"train": 36000, "val": 4000},
            "ave": {"train": 3700, "test": 400},
            "avvp": {"train": 1500, "test": 500},
            "ave_avvp": {"train": 2000, "test": 1000},
            "ucf_vgg": {"ucf_train": 1600, "ucf_test": 400, "vgg_train": 1600, "vgg_test": 400},
            "retrieval": {"test": 1000},
        },
        shard_size=1000,
    ),
}

# generative constants shared by all presets
TEMPORAL_STD = 0.35  # per-segment variation of a clip's event / background latent (AR(1), rho below)
TEMPORAL_RHO = 0.7
NUISANCE_STD = 1.0  # per-clip, per-modality nuisance vector
SOURCE_SHIFT = 0.6  # norm of the nuisance offset that tells UCF-like from VGG-like clips
PATTERN_STD = 0.6  # spatial background pattern of a video clip
BLOB_SIGMA = 0.25  # width of an event's blob on the video grid, as a fraction of the grid side
BACKGROUND_UNDER_EVENT = 0.5  # weight of the scene latent in an audio segment that has an event
NOISE_STD = {"audio": 0.3, "video": 0.3, "text": 0.15}  # after the renderer's unit-variance output
NUM_SCENES = 6
AVVP_MODALITY = (("both", 0.55), ("audio", 0.25), ("video", 0.20))  # how an AVVP event shows

STYLES = ("standard", "realistic")

# realistic style (applied after rendering, see Realism); sizes are per feature dimension unless said otherwise
# per-clip offset (std), constant over a clip's segments / cells / tokens; none for video, whose ReLU already loses
# much of the class information (an offset of std 0.3 before it cuts the probe of docs/SYNTHETIC-DATA.md from ~50% to ~30%)
REAL_CLIP_NUISANCE = {"audio": 1.0, "video": 0.0, "text": 0.3}
# more independent noise per segment / cell / token; for video it also smooths the ReLU in expectation, so that
# averaging over the grid keeps more of the class
REAL_EXTRA_NOISE = {"audio": 0.5, "video": 1.6, "text": 0.15}
REAL_AUDIO_OFFSET = (-5.0, 1.5)  # per-dimension offset: mean, std (log-mel energies are mostly negative)
REAL_AUDIO_SCALE = (3.0, 0.2)  # per-dimension std: median, lognormal sigma
REAL_AUDIO_LOUDNESS = 0.8  # per-clip gain (std), the same shift on every dimension of a clip
REAL_VIDEO_THRESHOLD = (0.3, 0.3)  # per-channel ReLU threshold in units of the pre-activation std: mean, std
REAL_VIDEO_DEAD = 0.06  # fraction of channels that are (nearly) always zero, at least one
REAL_VIDEO_DEAD_THRESHOLD = 4.0
REAL_VIDEO_SCALE = (0.5, 0.2)  # per-channel output scale: median, lognormal sigma (pool5 values are small)
REAL_VIDEO_GAIN = 0.1  # per-clip contrast: lognormal sigma of a multiplicative gain before the ReLU
REAL_TEXT_SCALE = (0.35, 0.15)  # per-dimension std: median, lognormal sigma
REAL_TEXT_OFFSET = 0.4  # std of the entries of the offset vector shared by all tokens
REAL_TEXT_OUTLIERS = 64  # one outlier dimension per this many dimensions (at least one)
REAL_TEXT_OUTLIER_SCALE = 6.0  # outlier dimensions: std this many times the others'
REAL_TEXT_OUTLIER_OFFSET = 3.0  # and an offset of this magnitude


def class_names(count: int) -> list:
    """Names of the first ``count`` world classes: ``"<noun> <verb>"``, all distinct."""
    if not 1 <= count <= MAX_CLASSES:
        raise SrcidError(f"number of classes must be in 1..{MAX_CLASSES}, got {count}")
    return [f"{NOUNS[i % len(NOUNS)]} {VERBS[(i + i // len(NOUNS)) % len(VERBS)]}" for i in range(count)]


class Renderer:
    """A fixed random map ``[latent, nuisance] -> features``: Linear, tanh, Linear, standardized."""

    def __init__(self, rng: np.random.Generator, latent_dim: int, nuisance_dim: int, hidden_dim: int, out_dim: int):
        gain = 1.6
        self.w_latent = (rng.standard_normal((latent_dim, hidden_dim)) * gain / math.sqrt(latent_dim + nuisance_dim)).astype(np.float32)
        self.w_nuisance = (rng.standard_normal((nuisance_dim, hidden_dim)) * gain / math.sqrt(latent_dim + nuisance_dim)).astype(np.float32)
        self.b1 = (rng.standard_normal(hidden_dim) * 0.5).astype(np.float32)
        self.w2 = (rng.standard_normal((hidden_dim, out_dim)) / math.sqrt(hidden_dim)).astype(np.float32)
        # standardize each output feature over random inputs, so noise levels are relative to unit variance
        probe_latent = rng.standard_normal((4096, latent_dim)).astype(np.float32)
        probe_nuisance = (rng.standard_normal((4096, nuisance_dim)) * NUISANCE_STD).astype(np.float32)
        raw = self.raw(probe_latent, self.nuisance_bias(probe_nuisance))
        self.mean = raw.mean(axis=0)
        self.scale = (1.0 / np.maximum(raw.std(axis=0), 1e-3)).astype(np.float32)

    def nuisance_bias(self, nuisance: np.ndarray) -> np.ndarray:
        """The hidden-layer bias of per-clip nuisance vectors ``[..., Dn] -> [..., H]``."""
        return nuisance @ self.w_nuisance + self.b1

    def raw(self, latent: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return np.tanh(latent @ self.w_latent + bias) @ self.w2

    def __call__(self, latent: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``latent [N, L]`` with a matching ``bias [N, H]`` -> standardized ``[N, D]``."""
        return (self.raw(latent, bias) - self.mean) * self.scale


def _lognormal(rng, median: float, sigma: float, size: int) -> np.ndarray:
    return (median * np.exp(sigma * rng.standard_normal(size))).astype(np.float32)


class Realism:
    """The ``realistic`` style: fixed per-dimension scales, offsets and sparsity, plus per-clip nuisance.

    Applied to the features that :func:`render` made (so classes, latents and
    labels are those of the ``standard`` style), with random numbers of its
    own, so the ``standard`` style is unchanged. Per modality:

    * more independent noise, and for audio and text a per-clip nuisance
      offset (constant over the clip's segments or tokens), so classes
      overlap more (video gets no offset: its ReLU already loses much);
    * audio, like VGGish log-mel features: ``offset_d + scale_d * x`` with
      offsets around -5 and stds around 3, plus a per-clip loudness shift;
    * video, like VGG19 pool5 maps: a per-clip contrast gain, a per-channel
      threshold, a ReLU (about 60% exact zeros) and a small per-channel scale;
      a few dead channels are (nearly) always zero;
    * text, like BERT token features: small per-dimension stds, one offset
      vector shared by all tokens, a few outlier dimensions with a large std
      and offset.
    """

    def __init__(self, preset: Preset, seed: int):
        rng = np.random.default_rng([seed, 0, 1])  # apart from the World's stream
        da, dv, dt = preset.audio_dim, preset.video_dim, preset.text_dim
        self.audio_offset = (REAL_AUDIO_OFFSET[0] + REAL_AUDIO_OFFSET[1] * rng.standard_normal(da)).astype(np.float32)
        self.audio_scale = _lognormal(rng, *REAL_AUDIO_SCALE, da)
        self.video_threshold = (REAL_VIDEO_THRESHOLD[0] + REAL_VIDEO_THRESHOLD[1] * rng.standard_normal(dv)).astype(np.float32)
        dead = rng.choice(dv, max(1, round(REAL_VIDEO_DEAD * dv)), replace=False)
        self.video_threshold[dead] = REAL_VIDEO_DEAD_THRESHOLD
        self.video_dead = np.sort(dead)
        self.video_scale = _lognormal(rng, *REAL_VIDEO_SCALE, dv)
        self.text_scale = _lognormal(rng, *REAL_TEXT_SCALE, dt)
        self.text_offset = (REAL_TEXT_OFFSET * rng.standard_normal(dt)).astype(np.float32)
        outliers = rng.choice(dt, max(1, round(dt / REAL_TEXT_OUTLIERS)), replace=False)
        self.text_scale[outliers] *= REAL_TEXT_OUTLIER_SCALE
        self.text_offset[outliers] = REAL_TEXT_OUTLIER_OFFSET * rng.choice([-1.0, 1.0], len(outliers))
        self.text_outliers = np.sort(outliers)

    @staticmethod
    def _unit(modality: str) -> float:
        """1 / the std of a feature after render() and the nuisance and noise added here."""
        return 1.0 / math.sqrt(1.0 + NOISE_STD[modality] ** 2 + REAL_CLIP_NUISANCE[modality] ** 2 + REAL_EXTRA_NOISE[modality] ** 2)

    def __call__(self, rng, plans: list, rendered: list) -> list:
        """Restyle each clip's features of :func:`render` in place; returns ``rendered``."""
        has = {m: [b for b, plan in enumerate(plans) if m in plan.modalities] for m in ("audio", "video", "text")}
        if has["audio"]:
            x = np.stack([rendered[b]["audio"] for b in has["audio"]])  # [n, T, D]
            n, D = len(x), x.shape[-1]
            x = x + rng.standard_normal((n, 1, D), dtype=np.float32) * REAL_CLIP_NUISANCE["audio"]
            x += rng.standard_normal(x.shape, dtype=np.float32) * REAL_EXTRA_NOISE["audio"]
            loud = rng.standard_normal((n, 1, 1), dtype=np.float32) * REAL_AUDIO_LOUDNESS
            x = self.audio_offset + self.audio_scale * (x * self._unit("audio")) + loud
            for i, b in enumerate(has["audio"]):
                rendered[b]["audio"] = x[i]
        if has["video"]:
            x = np.stack([rendered[b]["video"] for b in has["video"]])  # [n, T, G, G, D], worked on in place
            n, D = len(x), x.shape[-1]
            x += rng.standard_normal((n, 1, 1, 1, D), dtype=np.float32) * REAL_CLIP_NUISANCE["video"]
            noise = rng.standard_normal(x.shape, dtype=np.float32)
            noise *= REAL_EXTRA_NOISE["video"]
            x += noise
            del noise
            gain = np.exp(rng.standard_normal((n, 1, 1, 1, 1), dtype=np.float32) * REAL_VIDEO_GAIN)
            x *= self._unit("video") * gain  # a per-clip contrast
            x -= self.video_threshold
            np.maximum(x, 0.0, out=x)  # the ReLU
            x *= self.video_scale
            for i, b in enumerate(has["video"]):
                rendered[b]["video"] = x[i]
        for b in has["text"]:
            x = rendered[b]["text"]  # [S, D]
            x = x + rng.standard_normal((1, x.shape[-1]), dtype=np.float32) * REAL_CLIP_NUISANCE["text"]
            x += rng.standard_normal(x.shape, dtype=np.float32) * REAL_EXTRA_NOISE["text"]
            rendered[b]["text"] = self.text_offset + self.text_scale * (x * self._unit("text"))
        return rendered


class World:
    """Everything shared by the datasets of one :func:`synthesize` call."""

    def __init__(self, preset: Preset, seed: int, style: str = "standard"):
        if style not in STYLES:
            raise SrcidError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")
        self.preset, self.seed, self.style = preset, seed, style
        self.realism = Realism(preset, seed) if style == "realistic" else None
        rng = np.random.default_rng([seed, 0])
        p = preset
        L = p.latent_dim
        self.class_names = class_names(p.num_classes)
        self.noun_latents = rng.standard_normal((len(NOUNS), L)).astype(np.float32)
        self.verb_latents = rng.standard_normal((len(VERBS), L)).astype(np.float32)
        idx = np.arange(p.num_classes)
        self.class_nouns = idx % len(NOUNS)
        self.class_verbs = (idx + idx // len(NOUNS)) % len(VERBS)
        self.class_latents = (self.noun_latents[self.class_nouns] + self.verb_latents[self.class_verbs]) / math.sqrt(2.0)
        self.scene_latents = rng.standard_normal((NUM_SCENES, L)).astype(np.float32)
        self.word_latents = {w: v for w, v in zip(FUNCTION_WORDS, rng.standard_normal((len(FUNCTION_WORDS), L)).astype(np.float32))}
        for i, w in enumerate(NOUNS):
            self.word_latents[w] = self.noun_latents[i]
        for i, w in enumerate(VERBS):
            self.word_latents[w] = self.verb_latents[i]
        dims = {"audio": p.audio_dim, "video": p.video_dim, "text": p.text_dim}
        self.renderers = {m: Renderer(rng, L, p.nuisance_dim, p.hidden_dim, d) for m, d in dims.items()}
        self.text_positions = (rng.standard_normal((MAX_TOKENS, p.text_dim)) * 0.3).astype(np.float32)
        shift = rng.standard_normal((2, p.nuisance_dim))
        self.source_shifts = {  # nuisance offsets of the two sources of ucf_vgg
            "ucf": (shift[0] / np.linalg.norm(shift[0]) * SOURCE_SHIFT).astype(np.float32),
            "vgg": (shift[1] / np.linalg.norm(shift[1]) * SOURCE_SHIFT).astype(np.float32),
        }
        needed = p.ave_classes + p.avvp_classes - p.shared_classes
        if not (p.shared_classes <= min(p.ave_classes, p.avvp_classes) and needed <= p.num_classes
                and p.ucf_vgg_classes <= p.num_classes):
            raise SrcidError(f"preset {p.name}: downstream class counts do not fit in {p.num_classes} world classes")
        order = rng.permutation(p.num_classes)
        shared = order[: p.shared_classes]
        rest = order[p.shared_classes:]
        n_ave, n_avvp = p.ave_classes - p.shared_classes, p.avvp_classes - p.shared_classes
        self.subsets = {  # world class ids of each downstream dataset, in manifest order
            "pretrain": np.arange(p.num_classes),
            "ave": np.sort(np.concatenate([shared, rest[:n_ave]])),
            "avvp": np.sort(np.concatenate([shared, rest[n_ave:n_ave + n_avvp]])),
            "ave_avvp": np.sort(shared),
            "ucf_vgg": np.sort(rng.choice(p.num_classes, p.ucf_vgg_classes, replace=False)),
            "retrieval": np.arange(p.num_classes),
        }

    def prompt(self, rng: np.random.Generator, world_class: int) -> list:
        """The words of a random prompt sentence for a class."""
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        noun, verb = NOUNS[self.class_nouns[world_class]], VERBS[self.class_verbs[world_class]]
        return template.format(noun=noun, verb=verb).split()


# ----------------------------------------------------------------------------- clip plans
# A plan is the latent content of one clip: its events and scene, before rendering.


@dataclasses.dataclass
class Event:
    label: int  # index into the dataset's class list
    world_class: int
    onset: int
    offset: int  # exclusive
    audible: bool = True
    visible: bool = True


@dataclasses.dataclass
class Plan:
    events: list
    scene: int
    label: int | None  # clip-level class, None for multi-label clips
    modalities: tuple
    source: str | None = None  # "ucf" or "vgg" for ucf_vgg clips


def _run(rng, min_len: int) -> tuple:
    length = int(rng.integers(min_len, T + 1))
    onset = int(rng.integers(0, T - length + 1))
    return onset, onset + length


def plan_single_event(rng, classes: np.ndarray, modalities: tuple, min_len: int) -> Plan:
    """One event class over a contiguous run of segments, background elsewhere."""
    label = int(rng.integers(len(classes)))
    onset, offset = _run(rng, min_len)
    return Plan([Event(label, int(classes[label]), onset, offset)], int(rng.integers(NUM_SCENES)), label, modalities)


def plan_whole_clip(rng, classes: np.ndarray, modality: str, source: str) -> Plan:
    """One event over the whole clip, one modality (a UCF-like video or VGG-like audio clip)."""
    label = int(rng.integers(len(classes)))
    event = Event(label, int(classes[label]), 0, T, audible=modality == "audio", visible=modality == "video")
    return Plan([event], int(rng.integers(NUM_SCENES)), label, (modality,), source)


def plan_multi_event(rng, classes: np.ndarray) -> Plan:
    """1-3 events, each audible, visible or both, possibly overlapping (AVVP-like)."""
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    labels = rng.choice(len(classes), size=min(count, len(classes)), replace=False)
    kinds, weights = zip(*AVVP_MODALITY)
    events = []
    for label in labels:
        onset, offset = _run(rng, 2)
        kind = kinds[rng.choice(len(kinds), p=weights)]
        events.append(Event(int(label), int(classes[label]), onset, offset, kind != "video", kind != "audio"))
    return Plan(events, int(rng.integers(NUM_SCENES)), None, ("audio", "video"))


def segment_labels(plan: Plan, modality: str) -> list:
    """Per segment, the sorted class indices of the events this modality shows."""
    attr = "audible" if modality == "audio" else "visible"
    return [sorted({e.label for e in plan.events if getattr(e, attr) and e.onset <= t < e.offset}) for t in range(T)]


# ----------------------------------------------------------------------------- rendering


def _ar_noise(rng, shape_prefix: tuple, dim: int) -> np.ndarray:
    """Smooth per-segment variation ``[*prefix, T, dim]`` with std TEMPORAL_STD."""
    eps = rng.standard_normal((*shape_prefix, T, dim)).astype(np.float32)
    out = np.empty_like(eps)
    out[..., 0, :] = eps[..., 0, :]
    scale = math.sqrt(1.0 - TEMPORAL_RHO**2)
    for t in range(1, T):
        out[..., t, :] = TEMPORAL_RHO * out[..., t - 1, :] + scale * eps[..., t, :]
    return out * TEMPORAL_STD


def _nuisance(world: World, rng, plans: list, count: int) -> np.ndarray:
    n = (rng.standard_normal((count, world.preset.nuisance_dim)) * NUISANCE_STD).astype(np.float32)
    for i, plan in enumerate(plans):
        if plan.source is not None:
            n[i] += world.source_shifts[plan.source]
    return n


def render(world: World, rng, plans: list) -> list:
    """Features of each planned clip: a dict modality -> float32 array."""
    p, B, L = world.preset, len(plans), world.preset.latent_dim
    max_events = max(len(plan.events) for plan in plans)
    event_latents = np.zeros((B, max_events, T, L), np.float32)
    audible = np.zeros((B, max_events, T), np.float32)
    visible = np.zeros((B, max_events, T), np.float32)
    variation = _ar_noise(rng, (B, max_events + 1), L)  # the last slot varies the background
    scenes = world.scene_latents[[plan.scene for plan in plans]]
    for b, plan in enumerate(plans):
        for k, e in enumerate(plan.events):
            event_latents[b, k] = world.class_latents[e.world_class] + variation[b, k]
            audible[b, k, e.onset:e.offset] = e.audible
            visible[b, k, e.onset:e.offset] = e.visible
    background = scenes[:, None, :] + variation[:, -1]  # [B, T, L]
    out = [dict() for _ in plans]
    wanted = {m for plan in plans for m in plan.modalities}

    if "audio" in wanted:
        active = audible.sum(axis=1)  # [B, T]
        mix = np.einsum("bkt,bktl->btl", audible, event_latents) / np.sqrt(np.maximum(active, 1.0))[..., None]
        latent = mix + np.where(active > 0, BACKGROUND_UNDER_EVENT, 1.0)[..., None] * background
        renderer = world.renderers["audio"]
        bias = renderer.nuisance_bias(_nuisance(world, rng, plans, B))
        feats = renderer(latent.reshape(B * T, L), np.repeat(bias, T, axis=0)).reshape(B, T, -1)
        feats += rng.standard_normal(feats.shape, dtype=np.float32) * NOISE_STD["audio"]
        for b, plan in enumerate(plans):
            if "audio" in plan.modalities:
                out[b]["audio"] = feats[b]

    if "video" in wanted:
        G = p.video_grid
        sigma = BLOB_SIGMA * G
        grid = np.arange(G, dtype=np.float32)
        # the event's location: uniform start, a small random walk over segments, kept on the grid
        start = rng.uniform(0, G - 1, size=(B, max_events, 1, 2)).astype(np.float32)
        steps = rng.normal(0, 0.3, size=(B, max_events, T, 2)).astype(np.float32)
        steps[:, :, 0] = 0
        loc = np.clip(start + np.cumsum(steps, axis=2), 0, G - 1)
        dy = (grid[None, None, None, :] - loc[..., 0, None]) ** 2  # [B, K, T, G]
        dx = (grid[None, None, None, :] - loc[..., 1, None]) ** 2
        blob = np.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2)) * visible[..., None, None]  # [B,K,T,G,G]
        cover = blob.sum(axis=1)  # [B, T, G, G]
        weight = blob / np.maximum(cover, 1.0)[:, None]
        # background: the scene, a per-clip smooth spatial pattern, the temporal variation
        waves = 3
        freq = rng.uniform(0.3, 1.2, size=(B, waves, 2)).astype(np.float32) * (2 * math.pi / G)
        phase = rng.uniform(0, 2 * math.pi, size=(B, waves)).astype(np.float32)
        direction = rng.standard_normal((B, waves, L)).astype(np.float32) * (PATTERN_STD / math.sqrt(waves / 2))
        arg = freq[:, :, None, None, 0] * grid[None, None, :, None] + freq[:, :, None, None, 1] * grid[None, None, None, :]
        pattern = np.einsum("bwyx,bwl->byxl", np.cos(arg + phase[..., None, None]), direction)  # [B, G, G, L]
        back = background[:, :, None, None, :] + pattern[:, None]  # [B, T, G, G, L]
        cells = (1.0 - weight.sum(axis=1))[..., None] * back + np.einsum("bktyx,bktl->btyxl", weight, event_latents)
        renderer = world.renderers["video"]
        bias = renderer.nuisance_bias(_nuisance(world, rng, plans, B))
        feats = renderer(cells.reshape(-1, L), np.repeat(bias, T * G * G, axis=0)).reshape(B, T, G, G, -1)
        feats += rng.standard_normal(feats.shape, dtype=np.float32) * NOISE_STD["video"]
        for b, plan in enumerate(plans):
            if "video" in plan.modalities:
                out[b]["video"] = feats[b]

    if "text" in wanted:
        renderer = world.renderers["text"]
        bias = renderer.nuisance_bias(_nuisance(world, rng, plans, B))
        for b, plan in enumerate(plans):
            if "text" not in plan.modalities:
                continue
            words = world.prompt(rng, plan.events[0].world_class)
            latent = np.stack([world.word_latents[w] for w in words])
            latent = latent + rng.standard_normal(latent.shape, dtype=np.float32) * TEMPORAL_STD
            tokens = renderer(latent, np.repeat(bias[b:b + 1], len(words), axis=0)) + world.text_positions[: len(words)]
            tokens += rng.standard_normal(tokens.shape, dtype=np.float32) * NOISE_STD["text"]
            out[b]["text"] = tokens
            out[b]["caption"] = " ".join(words)
    return out


# ----------------------------------------------------------------------------- datasets


def _dataset_specs(world: World) -> dict:
    """Per dataset: modalities, tasks and, per split, the plan function."""
    sub = world.subsets

    def single(classes, modalities, min_len):
        return lambda rng: plan_single_event(rng, classes, modalities, min_len)

    def whole(classes, modality, source):
        return lambda rng: plan_whole_clip(rng, classes, modality, source)

    def multi(classes):
        return lambda rng: plan_multi_event(rng, classes)

    avt, av = ("audio", "video", "text"), ("audio", "video")
    return {
        "pretrain": (avt, ["pretrain"], {"train": single(sub["pretrain"], avt, 4), "val": single(sub["pretrain"], avt, 4)}),
        "ave": (av, ["classification"], {"train": single(sub["ave"], av, 3), "test": single(sub["ave"], av, 3)}),
        "avvp": (av, ["localization"], {"train": multi(sub["avvp"]), "test": multi(sub["avvp"])}),
        "ave_avvp": (av, ["classification", "localization"], {"train": single(sub["ave_avvp"], av, 3), "test": multi(sub["ave_avvp"])}),
        "ucf_vgg": (av, ["classification"], {
            "ucf_train": whole(sub["ucf_vgg"], "video", "ucf"), "ucf_test": whole(sub["ucf_vgg"], "video", "ucf"),
            "vgg_train": whole(sub["ucf_vgg"], "audio", "vgg"), "vgg_test": whole(sub["ucf_vgg"], "audio", "vgg"),
        }),
        "retrieval": (avt, ["retrieval"], {"test": single(sub["retrieval"], avt, 4)}),
    }


def _meta(plan: Plan, rendered: dict, source: str) -> dict:
    meta = {"label": plan.label, "segments": {m: segment_labels(plan, m) for m in plan.modalities if m != "text"}}
    if "caption" in rendered:
        meta["caption"] = rendered["caption"]
    meta["source"] = source
    return meta


def write_dataset(world: World, name: str, out, progress=None) -> Path:
    """Render one dataset folder of the world; returns the path of its manifest."""
    preset, seed = world.preset, world.seed
    modalities, tasks, split_plans = _dataset_specs(world)[name]
    shapes = preset.modality_shapes()
    classes = [world.class_names[i] for i in world.subsets[name]]
    source = f"synth:{preset.name}:seed={seed}"
    manifest_name = f"synthetic-{name}"
    if world.style != "standard":
        source += f":style={world.style}"
        manifest_name = f"synthetic-{world.style}-{name}"
    folder = Path(out) / name
    dataset_index = DATASETS.index(name) + 1
    total = sum(preset.splits[name].values())
    with DatasetWriter(folder, name=manifest_name, modalities={m: shapes[m] for m in modalities}, classes=classes,
                       tasks=tasks, max_samples_per_shard=preset.shard_size) as writer, \
            tqdm(total=total, desc=f"synth {name}", unit="clip", disable=None if progress is None else not progress) as bar:
        for split_index, (split, plan_fn) in enumerate(split_plans.items()):
            rng = np.random.default_rng([seed, dataset_index, split_index])
            style_rng = np.random.default_rng([seed, dataset_index, split_index, 1])  # used by the realistic style only
            count = preset.splits[name][split]
            for first in range(0, count, CHUNK):
                plans = [plan_fn(rng) for _ in range(min(CHUNK, count - first))]
                clips = render(world, rng, plans)
                if world.realism is not None:
                    clips = world.realism(style_rng, plans, clips)
                for i, (plan, rendered) in enumerate(zip(plans, clips)):
                    features = {m: rendered[m] for m in plan.modalities}
                    writer.write(split, f"{split}-{first + i:06d}", features, _meta(plan, rendered, source))
                bar.update(len(plans))
    return folder / "dataset.json"


def check_out_folder(out, overwrite: bool = False) -> Path:
    """``out`` (a symlink: the folder it points to) if :func:`synthesize` may write there.

    A new or empty folder is fine; one that is not empty is refused unless
    ``overwrite`` (then the finished datasets replace it whole), and never when
    it holds the current working folder. Touches nothing.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()  # replace the folder it points to, not the link
    if out.exists() and not out.is_dir():
        raise SrcidError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SrcidError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise SrcidError(f"--out {out}: holds the current folder {here}; --overwrite would delete it")
    return out


def synthesize(preset, out, seed: int = 0, *, progress=None, style: str = "standard", overwrite: bool = False) -> list:
    """Write the six synthetic datasets of ``preset`` under ``out``; returns their manifest paths.

    ``progress``: show tqdm bars (``None``: only on a terminal). ``style``:
    ``"standard"`` (standardized features, easy classes) or ``"realistic"``
    (the scales, offsets, sparsity and harder classes of real pre-extracted
    features; see :class:`Realism` and docs/SYNTHETIC-DATA.md).

    ``out`` must be new or empty, unless ``overwrite``: then the finished
    datasets replace it whole (no file of the old content is kept). They are
    written into a hidden sibling folder ``.OUT.synth-<pid>`` and renamed to
    ``out`` when complete; on any error that folder is removed and ``out`` is
    left as it was.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise SrcidError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if not isinstance(seed, int) or seed < 0:
        raise SrcidError(f"seed must be a non-negative integer, got {seed!r}")
    world = World(preset, seed, style)
    out = check_out_folder(out, overwrite)  # a symlink: the folder it points to

    def write_all(staging):
        for name in DATASETS:
            write_dataset(world, name, staging, progress)

    write_staged(out, "synth", "the datasets", write_all)
    return [out / name / "dataset.json" for name in DATASETS]
