"""The class read back from codes and general features (``srcid inspect``'s second table) against a plain-Python
reference on fresh random inputs, on structured cases whose answer is known, and on a model's forward pass."""
import json
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from helpers_model import layer_outputs
from srcid.data.batch import fitting_clips, step_labels
from srcid.data.reader import ShardLoader
from srcid.eval.code_classes import ClassReadingAccumulator
from srcid.eval.representations import representation_stats, to_markdown
from srcid.model import build_model_from_manifest, model_config

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_step_labels(labels, segments, steps):
    b = len(labels)
    out = np.full((b, steps), -1, np.int64)
    for i in range(b):
        for t in range(steps):
            if segments is None:
                out[i, t] = labels[i]
            elif segments.shape[1] == steps:
                on = [c for c in range(segments.shape[2]) if segments[i, t, c] > 0]
                if len(on) == 1:
                    out[i, t] = on[0]
    return out


@pytest.mark.parametrize("b,t,c", [(5, 10, 7), (3, 4, 1), (9, 13, 29)])
def test_step_labels_match_a_loop(b, t, c):
    g = torch.Generator().manual_seed(b * 100 + t)
    labels = torch.randint(-1, c, (b,), generator=g)
    segments = (torch.rand(b, t, c, generator=g) < 1.5 / c).float()  # steps with 0, 1 and several classes on
    got = step_labels(labels, segments, t)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), reference_step_labels(labels.numpy(), segments.numpy(), t))
    np.testing.assert_array_equal(step_labels(labels, None, t).numpy(), reference_step_labels(labels.numpy(), None, t))
    # segments of another length cannot be aligned with the steps: no step has a class
    assert bool((step_labels(labels, segments, t + 1) == -1).all())


def reference_reading(general, codes, labels, fitted):
    """The same reading with Python dicts and numpy float64 distances; ``fitted``: bool per step."""
    keep = labels >= 0
    general, codes, labels, fitted = general[keep], codes[keep], labels[keep], fitted[keep]
    keys = [tuple(row) for row in codes.tolist()]
    fit = [i for i in range(len(labels)) if fitted[i]]
    score = [i for i in range(len(labels)) if not fitted[i]]
    counts = Counter(int(labels[i]) for i in fit)
    majority = min(counts, key=lambda k: (-counts[k], k))
    per_code = {}
    for i in fit:
        per_code.setdefault(keys[i], Counter())[int(labels[i])] += 1
    code_class = {key: min(c, key=lambda k: (-c[k], k)) for key, c in per_code.items()}
    from_codes = np.mean([code_class.get(keys[i], majority) == labels[i] for i in score])
    seen = sorted(counts)
    means = np.stack([general[[i for i in fit if labels[i] == k]].mean(0) for k in seen])
    dist = ((general[score][:, None, :] - means[None]) ** 2).sum(-1)
    from_general = np.mean(np.asarray(seen)[dist.argmin(1)] == labels[score])
    return dict(labelled_steps=len(labels), classes=len(set(labels.tolist())), scored_steps=len(score),
                from_codes=from_codes, from_general=from_general,
                most_frequent=np.mean([labels[i] == majority for i in score]))


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_reading_matches_the_reference(stages, seed):
    rng = np.random.default_rng(seed)
    n_clips, steps, dim, classes = 37, 7, 5, 6
    accumulator = ClassReadingAccumulator()
    parts = {"g": [], "c": [], "l": [], "k": []}
    start = 0
    for size in (11, 16, 10):  # ragged batches of clips
        clip_labels = rng.integers(-1, classes, size)
        step = np.repeat(clip_labels[:, None], steps, 1)
        step[rng.random(step.shape) < 0.2] = -1  # background steps
        # features a little related to the class, so neither reading is at 0 or 100%
        g = rng.standard_normal((size, steps, dim)) + 0.8 * np.eye(classes, dim)[np.maximum(step, 0)]
        c = rng.integers(0, 9, (size, steps, stages))
        c[..., 0] = np.where(rng.random((size, steps)) < 0.5, np.maximum(step, 0), c[..., 0])
        k = np.repeat((start + np.arange(size))[:, None], steps, 1)
        start += size
        rows = lambda a: a.reshape(size * steps, *a.shape[2:])  # noqa: E731
        for key, value in zip("gclk", (g, c, step, k)):
            parts[key].append(rows(value))
        accumulator.add(torch.from_numpy(rows(g)).float(), torch.from_numpy(rows(c)),
                        torch.from_numpy(rows(step)), torch.from_numpy(rows(k) % 2 == 0))
    assert start == n_clips
    general = np.concatenate(parts["g"]).astype(np.float32).astype(np.float64)  # what the accumulator got
    expected = reference_reading(general, np.concatenate(parts["c"]), np.concatenate(parts["l"]),
                                 np.concatenate(parts["k"]) % 2 == 0)
    got = accumulator.result()
    for name, value in expected.items():
        assert getattr(got, name) == pytest.approx(value, abs=1e-12), name
    assert 0.0 < got.from_codes < 1.0 and 0.0 < got.from_general < 1.0


def test_codes_that_are_the_class_read_it_perfectly():
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 4, 200))
    clips = torch.arange(200) % 2 == 0
    general = torch.nn.functional.one_hot(labels, 4).double() * 10 + 0.1 * torch.randn(200, 4, dtype=torch.float64)
    accumulator = ClassReadingAccumulator()
    accumulator.add(general, (labels + 50).unsqueeze(1), labels, clips)
    got = accumulator.result()
    assert got.from_codes == 1.0 and got.from_general == 1.0 and got.classes == 4 and got.scored_steps == 100
    # one code for everything: the codes say nothing, and score what the most frequent class scores
    accumulator = ClassReadingAccumulator()
    accumulator.add(general, torch.zeros(200, 1, dtype=torch.int64), labels, clips)
    got = accumulator.result()
    assert got.from_codes == got.most_frequent < 0.5 and got.from_general == 1.0


def test_no_reading_without_two_classes_or_both_halves():
    accumulator = ClassReadingAccumulator()
    assert accumulator.result() is None
    accumulator.add(torch.randn(6, 3), torch.zeros(6, 1, dtype=torch.int64), torch.full((6,), 2),
                    torch.arange(6) % 2 == 0)
    assert accumulator.result() is None  # one class
    accumulator = ClassReadingAccumulator()
    accumulator.add(torch.randn(6, 3), torch.zeros(6, 1, dtype=torch.int64), torch.arange(6) % 3,
                    torch.ones(6, dtype=torch.bool))  # every clip fits: nothing to score
    assert accumulator.result() is None
    accumulator = ClassReadingAccumulator()
    accumulator.add(torch.randn(6, 3), torch.zeros(6, 1, dtype=torch.int64), torch.full((6,), -1),
                    torch.arange(6) % 2 == 0)
    assert accumulator.result() is None  # nothing labelled


def test_representation_stats_read_the_class_of_a_forward_pass(synth_dir):
    torch.manual_seed(0)
    loader = ShardLoader(synth_dir / "pretrain", "train", batch_size=24, shuffle=False, tail="drop")
    model = build_model_from_manifest("srcid", model_config("tiny"), loader.manifest)
    batch_list = [b for _, b in zip(range(3), loader.epoch(0))]
    stats = representation_stats(model, batch_list)
    collected = {}
    for batch, k, m, layer, keep in layer_outputs(model, batch_list):
        b, t = keep.shape
        seg = batch.segments.get(m)
        lab = reference_step_labels(batch.labels.numpy(), None if seg is None else seg.numpy(), t)
        part = collected.setdefault((k, m), {"g": [], "c": [], "l": [], "k": []})
        part["g"].append(layer.general[m].double().numpy()[keep])
        part["c"].append(layer.indices[m].reshape(b, t, -1).numpy()[keep])
        part["l"].append(lab[keep])
        fitted = np.array([zlib.crc32(key.encode()) % 2 == 0 for key in batch.keys])
        part["k"].append(np.repeat(fitted[:, None], t, 1)[keep])
    assert len(stats) == len(collected) == 6
    for s in stats:
        part = collected[(s.layer, s.modality)]
        expected = reference_reading(*(np.concatenate(part[key]) for key in "gclk"))
        assert s.labelled_steps == expected["labelled_steps"] and s.classes == expected["classes"] >= 2
        assert s.class_from_codes == pytest.approx(expected["from_codes"], abs=1e-12)
        assert s.class_from_general == pytest.approx(expected["from_general"], abs=1e-9)
        assert s.class_most_frequent == pytest.approx(expected["most_frequent"], abs=1e-12)
    assert all(s.labelled_steps < s.steps for s in stats if s.modality != "text")  # background steps left out
    table = to_markdown(stats)
    assert "The class read back on held-out labelled steps" in table
    row = [line for line in table.splitlines() if line.startswith("| 1 | text |")][-1]
    assert f"| {stats[2].labelled_steps} | {stats[2].classes} |" in row
    assert json.loads(json.dumps(stats[0].to_json(), allow_nan=False))["class_from_codes"] == stats[0].class_from_codes


def test_the_split_is_by_key():
    keys = [f"train-{i}" for i in range(400)]
    fit = fitting_clips(keys)
    assert fit.tolist() == [zlib.crc32(key.encode()) % 2 == 0 for key in keys]
    assert 150 < int(fit.sum()) < 250  # about half
    assert fitting_clips(keys[::-1]).tolist() == fit.tolist()[::-1]  # a clip's half does not depend on the order
