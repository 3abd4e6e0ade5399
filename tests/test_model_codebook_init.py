"""Codebooks used from the start: k-means / sample initialisation and dead codes by EMA usage, against references."""
import numpy as np
import pytest
import torch

from srcid.model.codebook import EMACodebook, kmeans
from srcid.model.config import QuantizerConfig
from srcid.model.rvq import ResidualMMEMAQuantizer
from srcid.model.vq import MMEMAQuantizer

MODS = ("audio", "video", "text")


def numpy_lloyd(rows, start, iters):
    """Lloyd's k-means in float64, written out: assign to the nearest centroid (lowest index on ties), average."""
    c = start.copy()
    for _ in range(iters + 1):
        d = ((rows[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        assign = d.argmin(1)
        counts = np.bincount(assign, minlength=len(c)).astype(np.float64)
        if _ == iters:
            return c, counts
        for k in range(len(c)):
            if counts[k] > 0:
                c[k] = rows[assign == k].mean(0)


@pytest.mark.parametrize("n,codes,dim,iters", [(97, 13, 5, 6), (40, 40, 3, 2), (33, 7, 17, 0)])
def test_kmeans_matches_a_float64_lloyd_from_the_same_start(n, codes, dim, iters):
    gen = torch.Generator().manual_seed(n)
    centers = torch.randn(codes // 2 + 1, dim, generator=gen) * 4
    rows = centers[torch.randint(0, len(centers), (n,), generator=gen)] + torch.randn(n, dim, generator=gen)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:codes]
    got, counts = kmeans(rows, codes, iters, torch.Generator().manual_seed(1))
    want, want_counts = numpy_lloyd(rows.double().numpy(), rows[pick].double().numpy(), iters)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    assert counts.sum() == n


def test_kmeans_with_fewer_rows_than_codes_draws_with_replacement():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    centroids, counts = kmeans(rows, 12, 3, torch.Generator().manual_seed(0))
    assert centroids.shape == (12, 3) and counts.sum() == 5
    assert all(any(torch.equal(c, r) for r in rows) for c in centroids)  # every centroid is a row (or their mean)


def quantizer(init="kmeans", **overrides):
    return MMEMAQuantizer(MODS, 4, QuantizerConfig(codebook_size=16, init=init, **overrides), seed=3)


def features(n, seed, scale=5.0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, 10, 4, generator=gen) * scale + offset for m in MODS}


@pytest.mark.parametrize("init", ["kmeans", "sample"])
def test_first_training_step_initialises_from_the_pooled_rows(init):
    q = quantizer(init)
    assert not q.book.is_initialized
    z = features(6, 1)
    out = q(z, update=True)
    assert q.book.is_initialized and float(q.book.initialized) == 1.0
    rows = torch.cat([z[m].reshape(-1, 4) for m in MODS])
    # the codebook the step assigned with is the initialisation (k-means from the same seeded draw)
    from srcid.model.randomness import INIT_STREAM, generator

    want, counts = kmeans(rows, 16, 10 if init == "kmeans" else 0, generator(3, 0, INIT_STREAM, 0))
    torch.testing.assert_close(out.codebook, want)
    # initialised far from U(+-1/L): every code near the data, most codes used at once
    assert float(out.codes_used) > 0.75
    assert (out.codebook.mean(0) - rows.mean(0)).abs().max() < 2.0


def test_uniform_init_is_the_authors_and_uses_few_codes_on_offset_data():
    z = features(6, 1, scale=0.5, offset=5.0)  # every row far from the origin, in one direction
    q = quantizer("uniform")
    assert q.book.is_initialized
    out = q(z, update=True)
    assert float(out.codes_used) <= 3 / 16  # the codes in U(+-1/L) are all near 0: the few most aligned win
    assert float(quantizer("kmeans")(z, update=True).codes_used) > 0.75


def test_initialisation_state_is_checkpointed_and_an_old_state_counts_as_initialised():
    q = quantizer()
    q(features(4, 2), update=True)
    fresh = quantizer()
    fresh.load_state_dict(q.state_dict())
    assert fresh.book.is_initialized
    torch.testing.assert_close(fresh.book.codebook, q.book.codebook, rtol=0, atol=0)
    old = {k: v for k, v in quantizer().state_dict().items() if not k.endswith("initialized")}
    other = quantizer()
    other.load_state_dict(old, strict=False)
    assert other.book.is_initialized


def test_initialisation_is_identical_for_the_same_rows_and_seed():
    a, b = quantizer(), quantizer()
    z = features(5, 4)
    a(z, update=True)
    b(z, update=True)
    assert torch.equal(a.book.codebook, b.book.codebook)


def test_ema_dead_codes_are_reset_to_pool_rows_and_get_a_grace_period():
    cfg = QuantizerConfig(codebook_size=8, init="uniform", dead_code="ema", dead_code_threshold=0.25,
                          dead_code_source="batch")
    book = EMACodebook(8, 3, cfg)
    with torch.no_grad():
        book.cluster_size.copy_(torch.tensor([10.0, 10.0, 10.0, 10.0, 1.0, 0.0, 20.0, 3.0]))
    before = book.codebook.clone()
    pool = torch.randn(50, 3, generator=torch.Generator().manual_seed(5)) + 7.0
    mean = float(book.cluster_size.mean())  # 8.0: dead below 0.25 * 8 = 2 -> codes 4 and 5
    book.reset_dead_codes(torch.ones(8, dtype=torch.bool), torch.Generator().manual_seed(0), pool)
    reset = [4, 5]
    kept = [i for i in range(8) if i not in reset]
    assert torch.equal(book.codebook[kept], before[kept])
    for i in reset:
        assert any(torch.equal(book.codebook[i], r) for r in pool)
        assert float(book.cluster_size[i]) == pytest.approx(mean)
    # the EMA keeps the new code: embed_sum / smoothed cluster size == the code (smoothing over the total before the reset)
    smoothed = (book.cluster_size + cfg.eps) / (64.0 + 8 * cfg.eps) * 64.0
    torch.testing.assert_close(book.embed_sum[reset] / smoothed[reset, None], book.codebook[reset])


def _far_book(dead_mask):
    cfg = QuantizerConfig(codebook_size=8, init="uniform", dead_code="ema", dead_code_threshold=0.25, dead_code_source="far")
    book = EMACodebook(8, 3, cfg)
    with torch.no_grad():
        book.codebook.copy_(torch.randn(8, 3, generator=torch.Generator().manual_seed(2)))
        book.embed_sum.copy_(book.codebook)
        book.cluster_size.copy_(torch.where(dead_mask, torch.tensor(0.0), torch.tensor(10.0)))
    return book


def test_far_source_gives_dead_codes_the_rows_farthest_from_the_codebook():
    dead = torch.tensor([False, True, False, False, False, False, True, False])  # codes 1 and 6 (dead early and late)
    book = _far_book(dead)
    # rows on (live) codes, and two rows far from every code: the dead codes must take those two
    on_codes = book.codebook[~dead].repeat(6, 1)
    far = torch.tensor([[40.0, 0.0, 0.0], [0.0, -40.0, 0.0]])
    pool = torch.cat([on_codes[:20], far[:1], on_codes[20:], far[1:]])
    before = book.codebook.clone()
    book.reset_dead_codes(torch.ones(8, dtype=torch.bool), torch.Generator().manual_seed(0), pool)
    assert torch.equal(book.codebook[~dead], before[~dead])
    got = {tuple(book.codebook[i].tolist()) for i in (1, 6)}
    assert got == {tuple(r.tolist()) for r in far}  # distinct rows, both far ones


@pytest.mark.parametrize("rows", [3, 10])  # fewer rows than codes (with replacement), more (distinct draws)
def test_far_source_draws_rows_in_proportion_to_their_squared_distance(rows):
    dead = torch.zeros(8, dtype=torch.bool)
    dead[0] = True  # the first dead code takes the first draw
    book = _far_book(dead)
    with torch.no_grad():
        book.codebook[0] = 1e3  # code 0 (dead) far from every row: not anyone's nearest code
    gen = torch.Generator().manual_seed(11)
    direction = torch.nn.functional.normalize(torch.randn(3, generator=gen), dim=0)
    pool = book.codebook[3] + torch.arange(1, rows + 1, dtype=torch.float32)[:, None] * 0.01 * direction
    sq = ((pool[:, None].double() - book.codebook[None].double()) ** 2).sum(-1).min(1).values
    want = sq / sq.sum()
    counts = torch.zeros(rows, dtype=torch.float64)
    for _ in range(4000):
        counts[book._pick_rows(pool, dead, gen)[0]] += 1
    assert torch.allclose(counts / counts.sum(), want, atol=0.025)  # 3 std of 4000 draws of p <= 0.5 is < 0.025


def test_far_source_is_the_same_for_the_same_seed():
    dead = torch.tensor([True, False, True, False, True, False, False, False])
    pool = torch.randn(30, 3, generator=torch.Generator().manual_seed(4)) * 3.0
    books = [_far_book(dead) for _ in range(2)]
    for book in books:
        book.reset_dead_codes(torch.ones(8, dtype=torch.bool), torch.Generator().manual_seed(9), pool)
    assert torch.equal(books[0].codebook, books[1].codebook)


def test_step_rule_ignores_cluster_size_and_the_batch_source_needs_a_pool():
    cfg = QuantizerConfig(codebook_size=4, init="uniform", dead_code="steps", dead_code_steps=2, dead_code_source="batch")
    book = EMACodebook(4, 2, cfg)
    pool = torch.full((3, 2), 9.0)
    used = torch.tensor([True, True, True, False])
    for _ in range(2):
        book.reset_dead_codes(used, torch.Generator().manual_seed(0), pool)
    assert not (book.codebook == 9.0).any()  # unused for 2 steps: not yet dead
    book.reset_dead_codes(used, torch.Generator().manual_seed(0), pool)
    assert torch.equal(book.codebook[3], torch.full((2,), 9.0)) and not (book.codebook[:3] == 9.0).any()


def test_rvq_stages_initialise_on_the_residuals_of_the_earlier_stages():
    from srcid.model.randomness import INIT_STREAM, generator

    cfg = QuantizerConfig(codebook_size=6, init="sample")
    q = ResidualMMEMAQuantizer(MODS, 3, cfg, stages=2, seed=1)
    for book in q.books:
        book.update = lambda *a, **k: None  # keep the initialisation for inspection
    gen = torch.Generator().manual_seed(6)
    z = {m: torch.randn(3, 10, 3, generator=gen) * 2.0 + 1.0 for m in MODS}
    q(z, update=True)
    rows = torch.cat([z[m].reshape(-1, 3) for m in MODS])
    start, _ = kmeans(rows, 6, 0, generator(1, 0, INIT_STREAM, 0))
    start[0] = 0.0  # code 0 of every stage stays zero
    residual = rows - start[((rows[:, None] - start[None]) ** 2).sum(-1).argmin(1)]
    want, _ = kmeans(residual, 6, 0, generator(1, 0, INIT_STREAM, 1))
    want[0] = 0.0
    torch.testing.assert_close(q.books[0].codebook, start)
    torch.testing.assert_close(q.books[1].codebook, want)


@pytest.mark.parametrize("key,value,message", [
    ("init", "bogus", "choose one of kmeans, sample, uniform"),
    ("dead_code", "never", "choose one of ema, steps"),
    ("dead_code_source", "random", "choose one of batch, far, active_code"),
    ("dead_code_threshold", 1.5, r"must lie in \[0, 1\)"),
    ("kmeans_iters", -1, "must be an integer >= 0"),
])
def test_bad_codebook_options_are_one_line_errors(key, value, message):
    from srcid.errors import SrcidError
    from srcid.model.config import model_config

    config = model_config("tiny")
    setattr(config.quantizer, key, value)
    with pytest.raises(SrcidError, match=f"quantizer.{key}=.*{message}"):
        config.validate()
