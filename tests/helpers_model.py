"""Input shapes, a tiny model and a random batch for the model and evaluation tests."""
from __future__ import annotations

import torch

from srcid.config import apply_overrides
from srcid.data.batch import Batch
from srcid.data.synth import PRESETS
from srcid.model import build_model, model_config

# hand-made per-clip shapes, small and different for every modality: [T, D] audio, [T, H, W, C] video, [tokens, D] text
SMALL_SHAPES = {"audio": (10, 6), "video": (10, 5, 5, 4), "text": (None, 7)}
# the per-clip shapes of the synthetic tiny preset's datasets (`srcid data synth --preset tiny`)
TINY_SHAPES = {m: tuple(shape) for m, (shape, _) in PRESETS["tiny"].modality_shapes().items()}


def tiny_model(variant: str = "srcid", shapes: dict = TINY_SHAPES, *, init_seed: int = 0, **overrides):
    """The tiny model preset built for ``shapes`` after ``torch.manual_seed(init_seed)``; ``overrides`` are
    model config keys (``text_target="features"``)."""
    torch.manual_seed(init_seed)
    config = apply_overrides(model_config("tiny"), [f"{k}={v}" for k, v in overrides.items()])
    return build_model(variant, config, shapes)


def random_batch(shapes: dict = TINY_SHAPES, batch: int = 6, *, seed: int = 0, generator=None, words: int = 7) -> Batch:
    """``batch`` clips of standard normal features of the per-clip ``shapes`` (drawn from ``generator``, else
    from a generator seeded with ``seed``); a modality with a varying first dimension (text) gets ``words``
    steps, of which each clip's first 1..words are real and the rest zero-padded. No clip has a label."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    features, masks = {}, {}
    for m, shape in shapes.items():
        steps = words if shape[0] is None else shape[0]
        x = torch.randn(batch, steps, *shape[1:], generator=gen)
        mask = torch.ones(batch, steps, dtype=torch.bool)
        if shape[0] is None:
            lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
            mask = torch.arange(steps)[None] < lengths[:, None]
            x = x * mask[..., None]
        features[m], masks[m] = x, mask
    return Batch(keys=[f"clip{i}" for i in range(batch)], features=features, masks=masks,
                 labels=torch.full((batch,), -1, dtype=torch.long))


def evaluation_codes_of_split(model_file, split_dir, split: str = "train") -> tuple:
    """``(clips, {"L<k>": {modality: distinct codes}})`` of an exported model over every clip of a split of a
    dataset, in evaluation mode, counted with Python sets over the real steps (for VQ layers)."""
    from srcid.data.reader import ShardLoader
    from srcid.model.export import load_model

    model = load_model(model_file)[0].eval()
    loader = ShardLoader(split_dir, split, batch_size=50, shuffle=False, modalities=tuple(model.input_shapes),
                         tail="merge")
    seen, clips = {}, 0
    with torch.no_grad():
        for batch in loader.epoch(0):
            clips += len(batch)
            output = model(batch)
            for k, layer in enumerate(output.layers, start=1):
                for m in output.modalities:
                    mask = layer.masks.get(m)
                    rows = layer.indices[m][mask] if mask is not None else layer.indices[m].reshape(-1)
                    seen.setdefault(f"L{k}", {}).setdefault(m, set()).update(rows.reshape(-1).tolist())
    return clips, {layer: {m: float(len(codes)) for m, codes in per.items()} for layer, per in seen.items()}
