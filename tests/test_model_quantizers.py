"""Quantizers: MMEMA by hand, commitment, straight-through, dead codes, the data-parallel hook, RVQ and FSQ."""
import itertools
import math

import pytest
import torch

from srcid.model.config import QuantizerConfig
from srcid.model.fsq import FSQQuantizer, fsq_codes_to_indices, fsq_indices_to_codes, fsq_round
from srcid.model.quantizers import mmema_mix
from srcid.model.rvq import ResidualMMEMAQuantizer
from srcid.model.vq import MMEMAQuantizer

MODS = ("audio", "video", "text")


def features(shape, seed, mods=MODS, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(*shape, generator=gen) * scale for m in mods}


# the authors' codebook recipe: uniform initialisation, dead codes by step count, reset near an active code
AUTHORS = {"init": "uniform", "dead_code": "steps", "dead_code_source": "active_code"}


def vq(num_codes=6, dim=3, mods=MODS, seed=43, **overrides):
    cfg = QuantizerConfig(codebook_size=num_codes, **{**AUTHORS, **overrides})
    return MMEMAQuantizer(mods, dim, cfg, seed=seed)


def test_mmema_update_by_hand():
    """L=4 codes, D=2, three modalities, 2 clips x 1 step: the codebook after one update, written out."""
    q = vq(num_codes=4, dim=2, dead_code_steps=10**6)
    book = q.book
    book.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    book.embed_sum.copy_(book.codebook)
    book.cluster_size.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    x = {  # [B=2, T=1, D=2]
        "audio": torch.tensor([[[0.9, 0.1]], [[0.1, 0.8]]]),  # -> codes 1, 2
        "video": torch.tensor([[[1.1, -0.2]], [[-0.1, 0.1]]]),  # -> codes 1, 0
        "text": torch.tensor([[[0.2, 0.9]], [[-0.8, -1.2]]]),  # -> codes 2, 3
    }
    out = q(x, update=True)
    assert out.indices["audio"].flatten().tolist() == [1, 2]
    assert out.indices["video"].flatten().tolist() == [1, 0]
    assert out.indices["text"].flatten().tolist() == [2, 3]

    g, eps, num = 0.99, 1e-5, 4
    a, v, t = (x[m].double().reshape(2, 2) for m in MODS)
    mixed = {"audio": 0.5 * a + 0.25 * v + 0.25 * t, "video": 0.5 * v + 0.25 * a + 0.25 * t, "text": 0.5 * t + 0.25 * a + 0.25 * v}
    assign = {"audio": [1, 2], "video": [1, 0], "text": [2, 3]}
    size = torch.ones(4, dtype=torch.float64)
    total = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    for m in MODS:  # audio, then video, then text
        counts = torch.zeros(4, dtype=torch.float64)
        sums = torch.zeros(4, 2, dtype=torch.float64)
        for row, code in enumerate(assign[m]):
            counts[code] += 1.0
            sums[code] += mixed[m][row]
        size = g * size + (1 - g) * counts
        total = g * total + (1 - g) * sums
        n = size.sum()
        smoothed = (size + eps) / (n + num * eps) * n
        codebook = total / smoothed[:, None]
    torch.testing.assert_close(book.codebook.double(), codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(book.cluster_size.double(), size, rtol=1e-6, atol=1e-7)
    # the output used the codebook before the update
    torch.testing.assert_close(out.quantized["audio"].reshape(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_mmema_mix_two_and_three_modalities():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 5, 4, generator=gen)
    mixed = mmema_mix(rows, 0.5)
    torch.testing.assert_close(mixed[1], 0.5 * rows[1] + 0.25 * rows[0] + 0.25 * rows[2])
    two = mmema_mix(rows[:2], 0.5)
    torch.testing.assert_close(two[0], 0.5 * rows[0] + 0.5 * rows[1])


def test_commitment_and_straight_through_match_reference():
    q = vq(num_codes=7, dim=5)
    x = {m: v.requires_grad_() for m, v in features((3, 4, 5), 2, scale=0.3).items()}
    codebook = q.book.codebook.clone().double()
    out = q(x, update=True)
    beta = 0.25
    codes = {}
    for m in MODS:
        flat = x[m].detach().double().reshape(-1, 5)
        dist = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
        idx = dist.argmin(1)
        assert torch.equal(out.indices[m].reshape(-1), idx)
        codes[m] = codebook[idx].reshape(3, 4, 5)
    for m in MODS:
        z = x[m].detach().double()
        expected = 2 * beta * ((z - codes[m]) ** 2).mean()
        expected = expected + sum(0.5 * beta * ((z - codes[n]) ** 2).mean() for n in MODS if n != m)
        torch.testing.assert_close(out.loss[m].double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.quantized[m].detach().double(), codes[m], rtol=1e-6, atol=1e-6)
    # straight-through: the gradient of sum(w * quantized) w.r.t. the input is w
    weights = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3))
    (out.quantized["video"] * weights).sum().backward()
    torch.testing.assert_close(x["video"].grad, weights)
    assert x["audio"].grad is None


def test_eval_lookup_does_not_update():
    q = vq(num_codes=5, dim=3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(features((2, 3, 3), 4), update=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out.indices["text"].shape == (2, 3)
    assert 0.0 < float(out.codes_used) <= 1.0


def test_usage_statistics():
    q = vq(num_codes=4, dim=2, dead_code_steps=10**6)
    q.book.codebook.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]]))
    q.book.embed_sum.copy_(q.book.codebook)
    x = {"audio": torch.tensor([[[9.0, 0.0], [9.0, 0.0], [0.0, 9.0], [0.0, 9.0]]]),
         "video": torch.tensor([[[9.0, 0.0]] * 4]),
         "text": torch.tensor([[[9.0, 0.0]] * 4])}
    out = q(x, update=True)
    assert math.isclose(float(out.perplexity["audio"]), 2.0, rel_tol=1e-5)
    assert math.isclose(float(out.perplexity["video"]), 1.0, rel_tol=1e-5)
    assert math.isclose(float(out.codes_used), 0.5)


def test_dead_code_reset_is_seeded_and_near_an_active_code():
    def make(seed=43):
        torch.manual_seed(0)
        return vq(num_codes=8, dim=4, dead_code_steps=3, active_window=2, seed=seed)

    first, second = make(), make()
    x = features((2, 3, 4), 5, scale=0.01)
    resets = 0
    for step in range(6):
        unused_before = first.book.unused_steps.clone()
        out = first(x, update=True)
        second(x, update=True)
        assert torch.equal(first.book.codebook, second.book.codebook), step
        used = set().union(*(set(out.indices[m].flatten().tolist()) for m in MODS))
        book = first.book
        for c in range(8):
            if c in used:
                assert float(book.unused_steps[c]) == 0.0
            elif float(unused_before[c]) + 1 > 3:  # unused for more than 3 steps: reset now
                resets += 1
                assert float(book.unused_steps[c]) == 0.0
                gaps = (book.codebook[c][None] - book.codebook[sorted(used)]).abs().max(1).values
                assert 0.0 < float(gaps.min()) <= 1.0 / 1024 + 1e-6, (step, c)
            else:
                assert float(book.unused_steps[c]) == float(unused_before[c]) + 1
    assert resets > 0
    other = make(seed=44)  # a different seed draws differently
    for _ in range(6):
        other(x, update=True)
    assert not torch.equal(other.book.codebook, first.book.codebook)


def test_dead_code_reset_survives_the_next_update():
    torch.manual_seed(1)
    q = vq(num_codes=6, dim=3, dead_code_steps=1, active_window=1)
    x = features((2, 2, 3), 6, scale=0.01)
    q(x, update=True)
    q(x, update=True)  # codes unused twice are reset now
    reset = q.book.codebook.clone()
    assert float(reset.abs().max()) < 1.0  # nothing far away is left
    q(x, update=True)
    assert float(q.book.codebook.abs().max()) < 1.0


def test_reduce_stats_hook_matches_one_process_on_the_whole_batch():
    x = features((4, 3, 3), 7)
    torch.manual_seed(2)
    whole = vq(num_codes=9, dim=3)
    rank0 = vq(num_codes=9, dim=3)
    rank1 = vq(num_codes=9, dim=3)
    rank0.load_state_dict(whole.state_dict())
    rank1.load_state_dict(whole.state_dict())
    half0 = {m: v[:2] for m, v in x.items()}
    half1 = {m: v[2:] for m, v in x.items()}
    captured = []
    rank1.reduce_stats = lambda flat: captured.append(flat.clone())
    rank1(half1, update=True)
    rank0.reduce_stats = lambda flat: (captured.append(flat), flat.add_(captured[0]))
    rank0(half0, update=True)
    whole(x, update=True)
    assert len(captured) == 2 and captured[0].dim() == 1 and captured[0].numel() == 3 * 9 + 3 * 9 * 3
    torch.testing.assert_close(rank0.book.codebook, whole.book.codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0.book.cluster_size, whole.book.cluster_size)


def test_codebook_stays_float32_under_casts_and_autocast():
    q = vq(num_codes=5, dim=4)
    before = q.book.codebook.clone()
    q.bfloat16()
    assert q.book.codebook.dtype == torch.float32 and torch.equal(q.book.codebook, before)
    x = {m: v.bfloat16() for m, v in features((2, 3, 4), 8).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x, update=True)
    assert q.book.codebook.dtype == torch.float32 and q.book.embed_sum.dtype == torch.float32
    assert out.quantized["audio"].dtype == torch.float32


def test_two_modality_quantizer():
    q = vq(num_codes=5, dim=3, mods=("audio", "text"))
    out = q(features((2, 3, 3), 9, mods=("audio", "text")), update=True)
    assert set(out.quantized) == {"audio", "text"}


# ---------------------------------------------------------------------------------------- RVQ


def test_rvq_zero_code_and_residual_sum():
    torch.manual_seed(3)
    cfg = QuantizerConfig(codebook_size=6, **AUTHORS)
    q = ResidualMMEMAQuantizer(MODS, 4, cfg, stages=3, seed=1)
    x = features((2, 5, 4), 10, scale=0.05)
    for _ in range(3):
        out = q(x, update=True)
        for book in q.books:
            assert torch.equal(book.codebook[0], torch.zeros(4))
    out = q(x, update=False)
    for m in MODS:
        idx = out.indices[m]
        assert idx.shape == (2, 5, 3)
        total = torch.zeros(2, 5, 4, dtype=torch.float64)
        residual = x[m].double()
        for s, book in enumerate(q.books):
            cb = book.codebook.double()
            expected = ((residual[..., None, :] - cb) ** 2).sum(-1).argmin(-1)
            assert torch.equal(idx[..., s], expected)
            total = total + cb[idx[..., s]]
            residual = residual - cb[idx[..., s]]
        torch.testing.assert_close(out.quantized[m].double(), total, rtol=1e-5, atol=1e-6)
    assert not q.uses_cmcm and out.codebook is None


def test_rvq_commitment_on_the_summed_output():
    torch.manual_seed(4)
    q = ResidualMMEMAQuantizer(MODS, 3, QuantizerConfig(codebook_size=5, **AUTHORS), stages=2, seed=1)
    x = features((2, 2, 3), 11)
    out = q(x, update=False)
    codes = {m: out.quantized[m].double() for m in MODS}
    for m in MODS:
        z = x[m].double()
        expected = 0.5 * ((z - codes[m]) ** 2).mean() + sum(0.125 * ((z - codes[n]) ** 2).mean() for n in MODS if n != m)
        torch.testing.assert_close(out.loss[m].double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------- FSQ


def fsq_reference(h, levels):
    """float64 FSQ: bound, round half to even, normalise."""
    h = h.double()
    out = torch.empty_like(h)
    for i, lv in enumerate(levels):
        half = (lv - 1) * (1 + 1e-3) / 2
        offset = 0.5 if lv % 2 == 0 else 0.0
        shift = math.atanh(offset / half)
        bounded = torch.tanh(h[..., i] + shift) * half - offset
        out[..., i] = torch.round(bounded) / (lv // 2)
    return out


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 4, 2), (3, 7)])
def test_fsq_rounding_and_index_bijection(levels):
    lv = torch.tensor(levels)
    h = torch.randn(50, len(levels), generator=torch.Generator().manual_seed(5)) * 3
    codes = fsq_round(h, lv)
    torch.testing.assert_close(codes.double(), fsq_reference(h, levels), rtol=0, atol=1e-6)
    # every grid point maps to a distinct index in [0, prod) and back
    grids = [[(d - lv_ // 2) / (lv_ // 2) for d in range(lv_)] for lv_ in levels]
    points = torch.tensor(list(itertools.product(*grids)), dtype=torch.float32)
    idx = fsq_codes_to_indices(points, lv)
    assert sorted(idx.tolist()) == list(range(math.prod(levels)))
    torch.testing.assert_close(fsq_indices_to_codes(idx, lv), points)
    # rounded codes are on the grid: exactly `levels[i]` values per channel at most
    for i, lv_ in enumerate(levels):
        assert len(set(codes[:, i].tolist())) <= lv_


def test_fsq_quantizer_straight_through_and_shapes():
    torch.manual_seed(6)
    q = FSQQuantizer(MODS, 6, (8, 5, 5, 5))
    x = {m: v.requires_grad_() for m, v in features((2, 3, 6), 12).items()}
    out = q(x, update=True)
    assert q.num_codes == 1000
    for m in MODS:
        assert out.quantized[m].shape == (2, 3, 6) and out.indices[m].shape == (2, 3)
        assert int(out.indices[m].max()) < 1000 and float(out.loss[m]) == 0.0
        expected = q.project_out(fsq_indices_to_codes(out.indices[m], q.levels))
        torch.testing.assert_close(out.quantized[m], expected, rtol=1e-5, atol=1e-6)
    out.quantized["audio"].sum().backward()
    assert x["audio"].grad is not None and float(x["audio"].grad.abs().sum()) > 0
