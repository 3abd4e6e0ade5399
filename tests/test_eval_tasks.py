"""Downstream task pieces: features of a frozen model, retrieval, localization targets, probes and tables."""
import math

import numpy as np
import pytest
import torch

from helpers_model import tiny_model
from srcid.errors import SrcidError
from srcid.eval.features import FeatureEncoder, SplitFeatures, parse_layers, scan_split
from srcid.eval.probe import evaluate_classification, train_head
from srcid.eval.tasks import (EvalSettings, Probe, RetrievalSet, cosine_similarity, expand_tasks, item_groups,
                              localization_targets, method_name, result_tables, run_probe, run_retrieval)

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_features(x, mask, *, modality="audio", digests=None, sources=None):
    n = x.shape[0]
    return SplitFeatures(
        folder="hand", split="test", modality=modality, keys=[f"k{i}" for i in range(n)], x=x, mask=mask,
        labels=torch.full((n,), -1), segments=None,
        digests=digests if digests is not None else [f"d{i}" for i in range(n)],
        metas=[{"source": s} for s in (sources if sources is not None else ["same"] * n)],
    )


def ragged_mask(n, steps, generator):
    lengths = torch.randint(1, steps + 1, (n,), generator=generator)
    return torch.arange(steps)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------- retrieval


def test_retrieval_of_engineered_pairs_is_perfect():
    g = torch.Generator().manual_seed(0)
    n, steps, dim = 11, 10, 8
    base = torch.randn(n, dim, generator=g)
    wobble = torch.randn(n, steps, dim, generator=g)
    wobble = wobble - wobble.mean(1, keepdim=True)  # zero mean over time: the item's pooled vector is base
    items = hand_features(base[:, None, :] + wobble, torch.ones(n, steps, dtype=torch.bool), modality="video")
    mask = ragged_mask(n, steps, g)
    text_x = torch.where(mask[..., None], base[:, None, :], 50.0 * torch.randn(n, steps, dim, generator=g))  # junk on padding
    text = hand_features(text_x, mask, modality="text")
    result = run_retrieval(RetrievalSet("video-text", "V", items, text, item_groups(items)))
    assert result["items"] == n and result["captions"] == n
    for direction in ("V->T", "T->V", "mean"):
        assert result[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}


def test_clips_of_one_recording_are_one_item_with_several_captions():
    g = torch.Generator().manual_seed(1)
    captions = [3, 1, 2, 5]  # captions per audio recording
    dim, steps = 6, 10
    bases = torch.randn(len(captions), dim, generator=g)
    rows, digests, sources, text_rows = [], [], [], []
    for r, count in enumerate(captions):
        for _ in range(count):
            rows.append(bases[r].expand(steps, dim))
            digests.append(f"audio{r}")
            sources.append(f"file{r}.wav")
            text_rows.append(bases[r] + 0.01 * torch.randn(dim, generator=g))
    n = len(rows)
    items = hand_features(torch.stack(rows), torch.ones(n, steps, dtype=torch.bool), digests=digests, sources=sources)
    text = hand_features(torch.stack(text_rows)[:, None, :].expand(n, steps, dim).clone(), torch.ones(n, steps, dtype=torch.bool),
                         modality="text")
    groups = item_groups(items)
    assert groups == [r for r, count in enumerate(captions) for _ in range(count)]
    result = run_retrieval(RetrievalSet("audio-text", "A", items, text, groups))
    assert result["items"] == len(captions) and result["captions"] == n
    assert result["A->T"]["R@1"] == 100.0 and result["T->A"]["R@1"] == 100.0


def test_item_groups_need_the_same_source_and_the_same_recording():
    items = hand_features(torch.zeros(5, 2, 3), torch.ones(5, 2, dtype=torch.bool),
                          digests=["a", "a", "b", "a", "b"], sources=["s1", "s1", "s1", "s2", "s1"])
    assert item_groups(items) == [0, 0, 1, 2, 1]


def reference_recall(sim, correct, k):
    """Brute force: sort each row, find the first correct target; ties count against the query."""
    hits = 0
    for q in range(sim.shape[0]):
        best = max(sim[q, t] for t in range(sim.shape[1]) if correct[q, t])
        rank = sum(1 for t in range(sim.shape[1]) if not correct[q, t] and sim[q, t] >= best)
        hits += rank < k
    return 100.0 * hits / sim.shape[0]


@pytest.mark.parametrize("seed", [2, 3])
def test_retrieval_matches_a_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n_items, dim, steps = 13 + seed, 5, 7
    groups = list(range(n_items)) + torch.randint(0, n_items, (9,), generator=g).tolist()
    n = len(groups)
    item_x = torch.randn(n_items, steps, dim, generator=g)
    item_mask = ragged_mask(n_items, steps, g)
    items = hand_features(item_x[groups], item_mask[groups], digests=[f"r{i}" for i in groups])
    text_mask = ragged_mask(n, steps, g)
    text = hand_features(torch.randn(n, steps, dim, generator=g), text_mask, modality="text")
    result = run_retrieval(RetrievalSet("audio-text", "A", items, text, item_groups(items)))

    def pool(x, mask):
        out = np.zeros((x.shape[0], x.shape[2]))
        for i in range(x.shape[0]):
            valid = [x[i, t].numpy().astype(np.float64) for t in range(x.shape[1]) if mask[i, t]]
            out[i] = np.mean(valid, axis=0)
        return out

    a, b = pool(item_x, item_mask), pool(text.x, text_mask)
    sim = np.array([[a_i @ b_j / (np.linalg.norm(a_i) * np.linalg.norm(b_j)) for b_j in b] for a_i in a])
    assert torch.allclose(cosine_similarity(torch.tensor(a), torch.tensor(b)), torch.tensor(sim), atol=1e-12)
    correct = np.zeros((n_items, n), dtype=bool)
    for j, i in enumerate(groups):
        correct[i, j] = True
    for k in (1, 5, 10):
        assert math.isclose(result["A->T"][f"R@{k}"], reference_recall(sim, correct, k))
        assert math.isclose(result["T->A"][f"R@{k}"], reference_recall(sim.T, correct.T, k))


# --------------------------------------------------------------------------- localization targets


def test_localization_targets_add_a_background_column():
    g = torch.Generator().manual_seed(4)
    segments = (torch.rand(6, 10, 5, generator=g) > 0.7).float()
    features = hand_features(torch.zeros(6, 10, 2), torch.ones(6, 10, dtype=torch.bool))
    features.segments = segments
    with_bg = localization_targets(features, True)
    assert with_bg.shape == (6, 10, 6)
    for i in range(6):
        for t in range(10):
            assert with_bg[i, t, 5] == (1.0 if segments[i, t].sum() == 0 else 0.0)
    assert torch.equal(with_bg[..., :5], segments)
    assert torch.equal(localization_targets(features, False), segments)


# --------------------------------------------------------------------------- features of a frozen model


def test_layer_choice_sets_the_feature_size(synth_dir):
    model = tiny_model().eval()
    scan = scan_split(synth_dir / "retrieval", "test", needed_by="test")
    one = FeatureEncoder(model, (1,), batch_size=32).split(scan, "text")
    both = FeatureEncoder(model, (1, 2), batch_size=32).split(scan, "text")
    assert one.x.shape == (100, 10, 16) and both.x.shape == (100, 10, 32)
    assert FeatureEncoder(model, (1, 2)).feature_dim == 32
    assert torch.equal(both.x[..., :16], one.x)
    assert one.keys == scan.keys and [m["caption"] for m in one.metas] == [scan.metas[k]["caption"] for k in scan.keys]
    # the valid steps are the caption's tokens, at most T = 10
    lengths = torch.tensor([len(scan.metas[k]["caption"].split()) for k in scan.keys]).clamp(max=10)
    assert torch.equal(one.mask.sum(1), lengths)
    # the same as encoding all clips in one batch (other padding, same result)
    from srcid.data.reader import ShardLoader

    batch = next(iter(ShardLoader(synth_dir / "retrieval", "test", batch_size=100, shuffle=False, modalities=("text",)).epoch(0)))
    direct = model.encode(batch.features["text"], "text", mask=batch.masks["text"], layers=(1, 2))
    assert torch.allclose(both.x, torch.cat(direct.quantized, -1), atol=1e-5)


def test_features_match_the_model_and_the_labels(synth_dir):
    from srcid.data.reader import ShardLoader

    model = tiny_model().eval()
    scan = scan_split(synth_dir / "ucf_vgg", "ucf_train", needed_by="test")
    assert scan.modalities() == ("video",)
    assert FeatureEncoder(model, (1,)).split(scan, "video").digests == []
    features = FeatureEncoder(model, (1, 2), batch_size=20).split(scan, "video", digests=True)
    batch = next(iter(ShardLoader(synth_dir / "ucf_vgg", "ucf_train", batch_size=48, shuffle=False, modalities=("video",)).epoch(0)))
    direct = model.encode(batch.features["video"], "video", layers=(1, 2))
    assert torch.allclose(features.x, torch.cat(direct.quantized, -1), atol=1e-6)
    assert features.labels.tolist() == [scan.metas[k]["label"] for k in scan.keys]
    for i, key in enumerate(scan.keys):
        expected = torch.zeros(10, 4)
        for t, classes in enumerate(scan.metas[key]["segments"]["video"]):
            expected[t, classes] = 1.0
        assert torch.equal(features.segments[i], expected)
    assert len(set(features.digests)) == len(features)


def test_parse_layers():
    two, one = tiny_model("srcid").eval(), tiny_model("dcid").eval()
    assert parse_layers(None, two) == (1, 2) and parse_layers(None, one) == (1,)
    assert parse_layers("1", two) == (1,) and parse_layers("1, 2", two) == (1, 2)
    with pytest.raises(SrcidError, match="has 1 layer; use --layers 1"):
        parse_layers("1,2", one)
    with pytest.raises(SrcidError, match="choose 1 or 1,2"):
        parse_layers("2", two)


# --------------------------------------------------------------------------- probes and tables


def separable(n, classes, g, noise=0.3):
    labels = torch.arange(n) % classes
    x = noise * torch.randn(n, 10, classes + 3, generator=g)
    x[torch.arange(n), :, labels] += 2.0
    return x, labels


def test_run_probe_trains_and_scores_each_seed():
    g = torch.Generator().manual_seed(6)
    train_x, train_y = separable(90, 4, g)
    test_x, test_y = separable(30, 4, g)
    train = hand_features(train_x, torch.ones(90, 10, dtype=torch.bool))
    test = hand_features(test_x, torch.ones(30, 10, dtype=torch.bool), modality="video")
    probe = Probe("ave", "A->V", "classification", train, test, train_y, test_y, 5, "accuracy")
    settings = EvalSettings(seeds=[43, 44], epochs_cls=4)
    result = run_probe(probe, settings)
    assert result["seeds"] == [43, 44] and result["keep"] == "last" and result["selected_epochs"] == [4, 4]
    for seed, run in zip((43, 44), result["runs"]):
        head = train_head("classification", train_x, train_y, epochs=4, seed=seed, num_classes=5, progress=False).head
        assert run == evaluate_classification(head, test_x, test_y)
    values = [run["accuracy"] for run in result["runs"]]
    assert result["metrics"]["accuracy"]["values"] == values
    assert math.isclose(result["metrics"]["accuracy"]["std"], float(np.std(values, ddof=1)))

    best = run_probe(probe, EvalSettings(protocol="authors", seeds=[43], epochs_cls=4))
    assert best["keep"] == "best" and 1 <= best["selected_epochs"][0] <= 4
    assert best["runs"][0]["accuracy"] >= 0


def test_result_tables_follow_the_paper_layout():
    def cell(v):
        return {"metrics": {"accuracy": {"values": [v]}, "precision": {"values": [v]}, "f1": {"values": [v]}}}

    results = {
        "ave": {"metric": "accuracy", "experiments": {d: cell(10.0 + i) for i, d in enumerate(("V->A", "A->V", "V->V", "A->A"))}},
        "avvp": {"metric": "precision", "experiments": {d: cell(20.0 + i) for i, d in enumerate(("V->A", "A->V", "V->V", "A->A"))}},
        "ave-avvp": {"metric": "f1", "experiments": {d: cell(30.0 + i) for i, d in enumerate(("V->A", "A->V"))}},
        "ucf-vgg": {"metric": "accuracy", "experiments": {d: cell(40.0 + i) for i, d in enumerate(("V->A", "A->V", "V->V", "A->A"))}},
        "retrieval": {"video-text": {"mean": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0}},
                      "audio-text": {"mean": {"R@1": 4.0, "R@5": 5.0, "R@10": 6.0}}},
    }
    tables = result_tables("SRCID", results, [43])
    row = tables["table2"]["rows"][0]
    assert [row["cells"][k]["mean"] for k in row["cells"]] == [10, 11, 20, 21, 30, 31, 40, 41]
    assert math.isclose(row["avg"]["mean"], (10 + 11 + 20 + 21 + 30 + 31 + 40 + 41) / 8)
    same = tables["table1"]["rows"][1]
    assert [None if c is None else c["mean"] for c in same["cells"].values()] == [12, 13, 22, 23, None, None, 42, 43]
    assert math.isclose(same["avg"]["mean"], (12 + 13 + 22 + 23 + 42 + 43) / 6)
    assert math.isclose(tables["table3"]["rows"][0]["avg"]["mean"], 3.5)
    assert set(result_tables("X", {"retrieval": results["retrieval"]}, [43])) == {"table3"}


def test_names_and_task_lists():
    assert method_name("srcid", (1,), 2) == "SRCID(only1)" and method_name("srcid", (1, 2), 2) == "SRCID"
    assert method_name("dcid-rvq3", (1,), 1) == "DCID(RVQ-3)"
    assert expand_tasks("all") == ("ave", "avvp", "ave-avvp", "ucf-vgg", "retrieval")
    assert expand_tasks("avvp") == ("avvp",)
    with pytest.raises(SrcidError):
        expand_tasks("vqa")
    with pytest.raises(SrcidError, match="--protocol"):
        EvalSettings(protocol="mine").validate()
