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


def layer_outputs(model, batches):
    """``(batch, k, modality, layer output, real [B, T] bool numpy)`` for every layer (1-based ``k``) and modality of
    ``model`` over ``batches``, in evaluation mode without gradient (the mode is left in evaluation)."""
    import numpy as np

    model.eval()
    with torch.no_grad():
        for batch in batches:
            output = model(batch)
            for k, layer in enumerate(output.layers, start=1):
                for m in output.modalities:
                    mask = layer.masks.get(m)
                    real = np.ones(tuple(layer.indices[m].shape[:2]), bool) if mask is None else mask.numpy()
                    yield batch, k, m, layer, real


def evaluation_codes_of_split(model_file, split_dir, split: str = "train") -> tuple:
    """``(clips, {"L<k>": {modality: distinct codes}}, {"L<k>": {modality: class read from the codes}})`` of an
    exported model over every clip of a split of a dataset, in evaluation mode, counted with Python sets and
    dicts over the real steps (for VQ layers). The class reading: a step's class is its segment's single class
    (audio, video) or its clip's label (text); clips whose key has an even CRC-32 fit each code's most frequent
    class (ties: the smallest), the others are scored."""
    import zlib
    from collections import Counter

    from srcid.data.reader import ShardLoader
    from srcid.model.export import load_model

    model = load_model(model_file)[0]
    loader = ShardLoader(split_dir, split, batch_size=50, shuffle=False, modalities=tuple(model.input_shapes),
                         tail="merge")
    seen, steps, clips, counted = {}, {}, 0, set()
    for batch, k, m, layer, real in layer_outputs(model, loader.epoch(0)):
        if id(batch) not in counted:
            counted.add(id(batch))
            clips += len(batch)
        seen.setdefault(f"L{k}", {}).setdefault(m, set()).update(layer.indices[m].numpy()[real].reshape(-1).tolist())
        indices = layer.indices[m].tolist()
        for i, key in enumerate(batch.keys):
            fit = zlib.crc32(key.encode()) % 2 == 0
            for t, code in enumerate(indices[i]):
                if not real[i, t]:
                    continue
                if m in batch.segments:
                    on = [c for c, v in enumerate(batch.segments[m][i, t].tolist()) if v > 0]
                    label = on[0] if len(on) == 1 else -1
                else:
                    label = int(batch.labels[i])
                if label >= 0:
                    steps.setdefault((f"L{k}", m), []).append((fit, code, label))
    reading = {}
    for (layer, m), found in steps.items():
        fitted = Counter(label for fit, _, label in found if fit)
        majority = min(fitted, key=lambda c: (-fitted[c], c))
        per_code = {}
        for fit, code, label in found:
            if fit:
                per_code.setdefault(code, Counter())[label] += 1
        choice = {code: min(c, key=lambda x: (-c[x], x)) for code, c in per_code.items()}
        scored = [(code, label) for fit, code, label in found if not fit]
        reading.setdefault(layer, {})[m] = sum(choice.get(code, majority) == label for code, label in scored) / len(scored)
    codes = {layer: {m: float(len(codes)) for m, codes in per.items()} for layer, per in seen.items()}
    return clips, codes, reading
