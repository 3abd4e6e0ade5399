"""The fused nearest-code kernel against srcid.ops' reference and float64 brute force.

Inputs live on the ``device`` fixture (tests/conftest.py): the GPU where CUDA
is present, so the compiled kernels run, else the CPU, where the kernels run in
Triton's interpreter with 32-wide row, code and dim tiles (the sizes below
cross those edges and the GPU's 64- and 128-wide ones). Random inputs are drawn
on the CPU from a seeded generator and moved to the device, so both machines
test the same numbers. The tests taking ``cuda_device`` run only on a GPU:
every autotune config forced in turn, bfloat16 inputs, a CUDA-graph capture,
all at the paper's step sizes.
"""
import functools

import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import deterministic_stats, nearest_code_fused
from srcid.kernels import nearest_code as nearest_module

MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]
NAN = float("nan")


def float64_distances(x, codebook, chunk=128):
    """``||x_i - c_l||^2`` in float64 from the differences (rows in chunks), where the inputs are."""
    x64, cb64 = x.double(), codebook.double()
    parts = [((x64[i : i + chunk, None, :] - cb64[None]) ** 2).sum(-1) for i in range(0, x64.shape[0], chunk)]
    return torch.cat(parts) if parts else x64.new_zeros(0, cb64.shape[0])


def first_minimum(dist):
    """Lowest index among each row's minima (integer min: no tie rule of a float argmin involved)."""
    best = dist.min(1).values
    codes = torch.arange(dist.shape[1], device=dist.device)
    return best, torch.where(dist == best[:, None], codes, dist.shape[1]).min(1).values


def float64_stats(indices, values, groups, num_codes):
    """Counts and sums of ``values`` per (group, code) of the given assignment, in float64."""
    n, dim = values.shape
    slot = indices.to(values.device) + torch.arange(n, device=values.device) // (n // groups) * num_codes
    counts = torch.zeros(groups * num_codes, dtype=torch.float64, device=values.device)
    counts.index_add_(0, slot, torch.ones(n, dtype=torch.float64, device=values.device))
    sums = torch.zeros(groups * num_codes, dim, dtype=torch.float64, device=values.device)
    sums.index_add_(0, slot, values.double())
    return counts.view(groups, num_codes), sums.view(groups, num_codes, dim)


def check_shapes(out, groups, num_codes, dim):
    shape = (num_codes,) if groups == 1 else (groups, num_codes)
    assert out.counts.shape == shape and out.sums.shape == shape + (dim,)
    assert out.counts.dtype == torch.float32 and out.sums.dtype == torch.float32
    assert out.indices.dtype == torch.int64 and out.sq_dist.dtype == torch.float32


def check_against_brute_force(out, x, codebook, values, groups, tie_tol):
    """Indices equal the float64 brute force wherever the best code wins by more than ``tie_tol``;
    elsewhere the chosen code is within ``tie_tol`` of the best. Counts exact, sums to float32 tolerance."""
    dist = float64_distances(x, codebook)
    best, indices = first_minimum(dist)
    num_codes, dim = codebook.shape
    got = out.indices.to(dist.device)
    second = dist.topk(2, dim=1, largest=False).values[:, 1] if num_codes > 1 else torch.full_like(best, float("inf"))
    clear = (second - best) > tie_tol * (1 + best)
    assert clear.double().mean() > 0.9
    assert torch.equal(got[clear], indices[clear])
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen <= best + tie_tol * (1 + best))
    torch.testing.assert_close(out.sq_dist.to(dist.device).double(), best, rtol=1e-5, atol=1e-3)
    # statistics of the kernel's own assignment
    counts, sums = float64_stats(got, values, groups, num_codes)
    check_shapes(out, groups, num_codes, dim)
    assert torch.equal(out.counts.to(dist.device).double().reshape(groups, num_codes), counts)
    torch.testing.assert_close(
        out.sums.to(dist.device).double().reshape(groups, num_codes, dim), sums, rtol=1e-5, atol=1e-4
    )


def check_exact(out, x, codebook, values, groups):
    """Data on which float32 arithmetic is exact: every result equals the float64 brute force bit for bit."""
    dist = float64_distances(x, codebook)
    best, indices = first_minimum(dist)
    num_codes, dim = codebook.shape
    counts, sums = float64_stats(indices, values, groups, num_codes)
    check_shapes(out, groups, num_codes, dim)
    assert torch.equal(out.indices.to(dist.device), indices)
    assert torch.equal(out.sq_dist.to(dist.device).double(), best)
    assert torch.equal(out.counts.to(dist.device).double().reshape(groups, num_codes), counts)
    assert torch.equal(out.sums.to(dist.device).double().reshape(groups, num_codes, dim), sums)


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("rows,codes,dim,groups", [(37, 53, 19, 1), (39, 53, 19, 3), (150, 97, 64, 3), (256, 256, 64, 1)])
def test_matches_brute_force_and_reference(rows, codes, dim, groups, deterministic, device):
    gen = torch.Generator().manual_seed(rows + codes + dim)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    codebook[codes // 2 :] += 6.0  # half the codes sit far away: no row picks them
    values = torch.randn(rows, dim, generator=gen) * 3.0 + 1.0
    x, codebook, values = x.to(device), codebook.to(device), values.to(device)
    out = nearest_code_fused(x, codebook, values=values, stats=True, groups=groups, deterministic=deterministic)
    assert out.indices.device == x.device
    check_against_brute_force(out, x.cpu(), codebook.cpu(), values.cpu(), groups, tie_tol=1e-4)
    ref = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=groups)
    same = out.indices == ref.indices
    assert same.float().mean() > 0.95
    if bool(same.all()):
        assert torch.equal(out.counts, ref.counts)
        torch.testing.assert_close(out.sums, ref.sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-4)
    unused = out.counts.reshape(groups, codes)[:, codes // 2 :]
    assert torch.all(unused == 0) and torch.all(out.sums.reshape(groups, codes, dim)[:, codes // 2 :] == 0)


@pytest.mark.parametrize("deterministic", MODES)
def test_ties_go_to_lowest_index(deterministic, device):
    """Small-integer data: every float32 score is exact, so ties are exact and common."""
    gen = torch.Generator().manual_seed(21)
    rows, codes, dim = 90, 77, 5
    x = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=gen).float()
    codebook[70] = codebook[3]  # duplicates in a later code tile (tiles of 32)
    codebook[40] = codebook[35]  # duplicate in the same tile
    codebook[64] = codebook[10]  # duplicate at a tile's first position
    out = nearest_code_fused(x.to(device), codebook.to(device), stats=True, deterministic=deterministic)
    dist = float64_distances(x, codebook)
    tied_rows = (dist == dist.min(1, keepdim=True).values).sum(1) > 1
    assert tied_rows.sum() > 10
    check_exact(out, x, codebook, x, 1)
    assert out.counts[70] == 0 and out.counts[40] == 0 and out.counts[64] == 0
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), stats=True)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)


# duplicated codes whose copies sit in different code tiles: 32-wide (interpreter) and 64- and 128-wide (GPU)
TILE_STRADDLING_DUPLICATES = [(10, 70), (5, 130), (31, 32), (63, 64), (127, 128), (40, 149), (96, 97)]


@pytest.mark.parametrize("deterministic", MODES)
def test_ties_across_code_tile_boundaries_go_to_lowest_index(deterministic, device):
    """Exact ties between copies of one code in different code tiles: the lowest index wins, as
    the first minimum of the float64 distances (the later tile must not replace an equal score)."""
    gen = torch.Generator().manual_seed(140)
    rows, codes, dim = 75, 150, 7  # 150 codes: a ragged last tile of every width
    x = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=gen).float() * 2.0 + 0.5  # no other duplicates likely
    for row, (low, high) in enumerate(TILE_STRADDLING_DUPLICATES):
        codebook[high] = codebook[low]
        x[2 * row] = codebook[high]  # rows on the copies: distance 0 to both, ties for sure
        x[2 * row + 1] = codebook[high] + 0.25
    out = nearest_code_fused(x.to(device), codebook.to(device), values=x.flip(0).to(device), stats=True,
                             groups=3, deterministic=deterministic)
    check_exact(out, x, codebook, x.flip(0), 3)
    for row, (low, high) in enumerate(TILE_STRADDLING_DUPLICATES):
        assert out.indices[2 * row] == low and out.indices[2 * row + 1] == low and out.sq_dist[2 * row] == 0
        assert torch.all(out.counts[:, high] == 0)
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), values=x.flip(0).to(device), stats=True, groups=3)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)
    assert torch.equal(out.indices.cpu(), torch.argmin(float64_distances(x, codebook), dim=1))


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize(
    "rows,codes,dim,groups",
    [(1, 1, 1, 1), (1, 37, 5, 1), (37, 1, 5, 1), (37, 45, 1, 1), (3, 1, 1, 3), (1, 40, 33, 1)],
    ids=["N1-L1-D1", "N1", "L1", "D1", "L1-D1-one-row-per-group", "N1-two-dim-tiles"],
)
def test_single_row_code_or_dim(rows, codes, dim, groups, deterministic, device):
    gen = torch.Generator().manual_seed(rows * 100 + codes * 10 + dim)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    out = nearest_code_fused(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=groups,
                             deterministic=deterministic)
    check_against_brute_force(out, x, codebook, values, groups, tie_tol=1e-4)
    if codes == 1:
        assert torch.all(out.indices == 0)
        assert torch.equal(out.counts.reshape(groups).cpu(), torch.full((groups,), rows / groups))
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=groups)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-5)


def test_rows_far_from_every_code(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(45, 24, generator=gen) * 0.5 + 40.0
    codebook = torch.randn(60, 24, generator=gen) * 2.0
    out = nearest_code_fused(x.to(device), codebook.to(device), values=(x * 2).to(device), stats=True, groups=3)
    check_against_brute_force(out, x, codebook, x * 2, 3, tie_tol=1e-5)
    assert torch.all(out.sq_dist > 1e4)


@pytest.mark.parametrize("deterministic", MODES)
def test_half_precision_and_strided_inputs(deterministic, device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(19, 66, generator=gen).half().to(device).t()  # [66, 19], column-major
    values = torch.randn(66, 19, generator=gen).to(device=device, dtype=torch.bfloat16)
    codebook = torch.randn(19, 40, generator=gen).to(device).t()  # strided float32 codebook [40, 19]
    assert not x.is_contiguous() and not codebook.is_contiguous()
    out = nearest_code_fused(x, codebook, values=values, stats=True, groups=3, deterministic=deterministic)
    check_against_brute_force(out, x.cpu(), codebook.cpu(), values.cpu(), 3, tie_tol=1e-4)
    ref = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=3)
    assert (out.indices == ref.indices).float().mean() > 0.95


def _layouts(gen, device):
    """``(name, x, codebook, values)`` as views on ``device``: sliced, stepped, transposed and expanded (stride 0)."""
    rows, codes, dim = 35, 41, 21
    wide, book_t, one_row, one_col, vals, book = (
        torch.randn(shape, generator=gen).to(device)
        for shape in ((2 * rows, dim + 5), (dim + 3, codes), (1, dim), (rows, 1), (rows, dim), (codes, dim))
    )
    return [
        # rows with a step and an offset column window; a transposed, row-sliced codebook; one values row for all
        ("sliced-transposed-expanded-values", wide[::2, 3 : 3 + dim], book_t[2 : 2 + dim].t(), one_row.expand(rows, dim)),
        # every row the same (stride 0 over rows); values constant along dims
        ("expanded-rows", one_row.expand(rows, dim), book, one_col.expand(rows, dim)),
        # x constant along its dims (stride 0 over dims), a column-major values view
        ("expanded-dims", one_col.expand(rows, dim), book_t[:dim].t(), vals.t().contiguous().t()),
        # every code the same (stride 0 over codes): every row ties on all codes and takes code 0
        ("expanded-codebook", wide[:rows, :dim], book[:1].expand(codes, dim), vals),
    ]


@pytest.mark.parametrize("deterministic", MODES)
def test_non_contiguous_and_expanded_inputs(deterministic, device):
    gen = torch.Generator().manual_seed(77)
    for name, x, codebook, values in _layouts(gen, device):
        assert not x.is_contiguous() or not codebook.is_contiguous() or not values.is_contiguous(), name
        assert 0 in x.stride() + codebook.stride() + values.stride() or name.startswith("sliced"), name
        out = nearest_code_fused(x, codebook, values=values, stats=True, deterministic=deterministic)
        x64, cb64, v64 = x.cpu().double(), codebook.cpu().double(), values.cpu().double()
        dist = float64_distances(x64, cb64)
        best, indices = first_minimum(dist)
        if name == "expanded-codebook":
            assert torch.all(indices == 0)
            assert torch.equal(out.indices.cpu(), indices), name  # exact ties everywhere: the lowest index
        else:
            check_against_brute_force(out, x64, cb64, v64, 1, tie_tol=1e-4)
        torch.testing.assert_close(out.sq_dist.cpu().double(), best, rtol=1e-5, atol=1e-4, msg=name)
        counts, sums = float64_stats(out.indices.cpu(), v64, 1, codebook.shape[0])
        assert torch.equal(out.counts.cpu().double(), counts[0]), name
        torch.testing.assert_close(out.sums.cpu().double(), sums[0], rtol=1e-5, atol=1e-4, msg=name)
        # the same numbers, contiguous: the same result
        dense = nearest_code_fused(x.contiguous(), codebook.contiguous(), values=values.contiguous(), stats=True,
                                   deterministic=deterministic)
        assert torch.equal(out.indices, dense.indices) and torch.equal(out.counts, dense.counts), name


@pytest.mark.parametrize("deterministic", MODES)
def test_nan_rows_values_and_codes_follow_the_reference(deterministic, device):
    """NaN scores rank below every number, as torch.min does in the reference: a row with a NaN takes
    code 0 and a NaN distance; a code with a NaN captures every row (the first such code). NaN values
    propagate into their code's sums. Indices, distances and statistics equal the reference's."""
    gen = torch.Generator().manual_seed(55)
    rows, codes, dim = 70, 75, 19
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    x[5, 3] = NAN
    x[40] = NAN
    values[12, 7] = NAN  # x[12] is finite: only the sums of its code turn NaN
    nan_rows = torch.tensor([5, 40])
    finite = torch.ones(rows, dtype=torch.bool)
    finite[nan_rows] = False

    out = nearest_code_fused(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=2,
                             deterministic=deterministic)
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=2)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.sums, ref.sums, rtol=1e-5, atol=1e-4, equal_nan=True)
    # independently: finite rows as the float64 brute force, NaN rows on code 0 with a NaN distance
    assert torch.all(out.indices[nan_rows.to(device)] == 0) and torch.all(out.sq_dist[nan_rows.to(device)].isnan())
    dist = float64_distances(x[finite], codebook)
    best, indices = first_minimum(dist)
    assert torch.equal(out.indices.cpu()[finite], indices)
    torch.testing.assert_close(out.sq_dist.cpu()[finite].double(), best, rtol=1e-5, atol=1e-3)
    counts, sums = float64_stats(out.indices.cpu(), values, 2, codes)
    assert torch.equal(out.counts.cpu().double(), counts)
    torch.testing.assert_close(out.sums.cpu().double(), sums, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert out.counts[0, 0] >= 1 and out.counts[1, 0] >= 1  # the NaN rows 5 and 40, one per group
    nan_sums = out.sums.isnan().cpu()
    assert nan_sums.sum() == 1 and nan_sums[0, int(out.indices[12]), 7]  # only values[12, 7] is NaN

    # NaN in two codes (in different 32- and 64-wide code tiles): every row takes the first of them
    bad_book = codebook.clone()
    bad_book[37, 4] = NAN
    bad_book[70, 0] = NAN
    clean_x = torch.randn(rows, dim, generator=gen)
    out = nearest_code_fused(clean_x.to(device), bad_book.to(device), stats=True, deterministic=deterministic)
    ref = ops.nearest_code_reference(clean_x.to(device), bad_book.to(device), stats=True)
    assert torch.all(out.indices == 37) and torch.all(out.sq_dist.isnan())
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)
    assert out.counts[37] == rows
    torch.testing.assert_close(out.sums, ref.sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.sums.cpu()[37].double(), clean_x.double().sum(0), rtol=1e-5, atol=1e-4)


def test_without_stats_and_through_ops(device):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(33, 20, generator=gen).to(device)
    codebook = torch.randn(35, 20, generator=gen).to(device)
    out = ops.nearest_code(x, codebook, impl="fused")
    assert out.counts is None and out.sums is None
    assert out.indices.dtype == torch.int64 and out.sq_dist.dtype == torch.float32
    ref = ops.nearest_code(x, codebook, impl="reference")
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("deterministic", MODES)
def test_long_segments_are_summed_in_full(deterministic, device):
    """Most rows pick one code: its segment spans several row blocks of the segment-sum kernel."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(150, 40, generator=gen)
    codebook = torch.randn(6, 40, generator=gen) + 4.0
    codebook[2] = 0.0
    first = nearest_code_fused(x.to(device), codebook.to(device), stats=True, groups=3, deterministic=deterministic)
    check_against_brute_force(first, x, codebook, x, 3, tie_tol=1e-4)
    assert torch.all(first.counts[:, 2] > 40)
    second = nearest_code_fused(x.to(device), codebook.to(device), stats=True, groups=3, deterministic=deterministic)
    if deterministic:
        assert torch.equal(first.sums, second.sums) and torch.equal(first.counts, second.counts)


def test_mode_selection(monkeypatch, device):
    monkeypatch.delenv("SRCID_DETERMINISTIC", raising=False)
    assert deterministic_stats() is False
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert deterministic_stats() is True
        monkeypatch.setenv("SRCID_DETERMINISTIC", "0")
        assert deterministic_stats() is False
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv("SRCID_DETERMINISTIC", "1")
    assert deterministic_stats() is True
    used = []
    real = nearest_module._segment_stats
    monkeypatch.setattr(nearest_module, "_segment_stats", lambda *a: (used.append(1), real(*a)))
    x, codebook = torch.randn(6, 3, device=device), torch.randn(4, 3, device=device)
    nearest_code_fused(x, codebook, stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "0")
    nearest_code_fused(x, codebook, stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "maybe")
    with pytest.raises(SrcidError, match="SRCID_DETERMINISTIC"):
        nearest_code_fused(x, codebook, stats=True)


def test_bad_inputs_are_clear_errors(device):
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    with pytest.raises(SrcidError, match=r"x \(4, 3\) and codebook \(5, 2\)"):
        nearest_code_fused(zeros(4, 3), zeros(5, 2))
    with pytest.raises(SrcidError, match="no codes"):
        nearest_code_fused(zeros(4, 3), zeros(0, 3))
    with pytest.raises(SrcidError, match="2 equal groups"):
        nearest_code_fused(zeros(5, 3), zeros(4, 3), groups=2)
    with pytest.raises(SrcidError, match="floating-point"):
        nearest_code_fused(zeros(4, 3, dtype=torch.int64), zeros(5, 3))


def test_empty_batch(device):
    out = nearest_code_fused(torch.zeros(0, 7, device=device), torch.randn(5, 7, device=device), stats=True, groups=3)
    assert out.indices.shape == (0,) and out.counts.shape == (3, 5) and out.sums.shape == (3, 5, 7)
    assert torch.all(out.counts == 0) and torch.all(out.sums == 0)


# -- compiled kernels only (CUDA) -----------------------------------------------------------------

PAPER_SHAPES = [(2400, 400, 256), (7680, 400, 256), (1001, 397, 250)]  # rows of one step (3 modalities), L, D; ragged


def _config_params(tuner):
    """One parameter per config of ``tuner`` (a GPU's list; the interpreter's single config on a CPU, skipped)."""
    return [pytest.param(i, id="-".join(f"{k}{v}" for k, v in c.all_kwargs().items())) for i, c in enumerate(tuner.configs)]


@functools.lru_cache(maxsize=None)
def _paper_case(rows, codes, dim, exact, device_type):
    """Inputs at a paper size, on the GPU. ``exact``: values on a 1/4 grid, on
    which float32 products and sums are exact, with duplicated codes that straddle 64- and 128-wide code tiles."""
    gen = torch.Generator().manual_seed(rows + codes + dim + exact)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    if exact:
        x, codebook, values = (torch.round(t * 4.0) / 4.0 for t in (x, codebook, values))
        for row, (low, high) in enumerate([(10, 70), (5, 130), (63, 64), (127, 128), (200, codes - 1)]):
            codebook[high] = codebook[low]
            x[row * 97] = codebook[high]
    x, codebook, values = (t.to(device_type) for t in (x, codebook, values))
    return x, codebook, values


def _run_paper_checks(device, deterministic):
    for (rows, codes, dim) in PAPER_SHAPES:
        for exact in (True, False):
            x, codebook, values = _paper_case(rows, codes, dim, exact, device.type)
            groups = 3 if rows % 3 == 0 else 7  # 1001 rows: 7 groups of 143
            out = nearest_code_fused(x, codebook, values=values, stats=True, groups=groups, deterministic=deterministic)
            where = f"{rows}x{codes}x{dim} exact={exact}"
            if exact:
                check_exact(out, x, codebook, values, groups)
            else:
                check_against_brute_force(out, x, codebook, values, groups, tie_tol=1e-4)
            plain = nearest_code_fused(x, codebook, deterministic=deterministic)
            assert torch.equal(plain.indices, out.indices), where


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("config_index", _config_params(nearest_module._nearest_code_kernel))
def test_every_gpu_config_of_the_nearest_code_kernel_at_paper_sizes(config_index, deterministic, cuda_device,
                                                                     forced_config):
    tuner = nearest_module._nearest_code_kernel
    with forced_config(tuner, tuner.configs[config_index]):
        _run_paper_checks(cuda_device, deterministic)


@pytest.mark.parametrize("config_index", _config_params(nearest_module._segment_sum_kernel))
def test_every_gpu_config_of_the_segment_sum_kernel_at_paper_sizes(config_index, cuda_device, forced_config):
    tuner = nearest_module._segment_sum_kernel
    with forced_config(tuner, tuner.configs[config_index]):
        _run_paper_checks(cuda_device, deterministic=True)


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("rows", [2400, 7680])
def test_bfloat16_inputs_at_paper_sizes(rows, deterministic, cuda_device):
    gen = torch.Generator().manual_seed(rows)
    x, codebook, values = (torch.randn(n, 256, generator=gen).to(cuda_device, torch.bfloat16) for n in (rows, 400, rows))
    out = nearest_code_fused(x, codebook, values=values, stats=True, groups=3, deterministic=deterministic)
    # the float64 brute force of the bfloat16 numbers (exactly representable in float32 and float64)
    check_against_brute_force(out, x, codebook, values, 3, tie_tol=1e-4)
    ref = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=3)
    assert (out.indices == ref.indices).float().mean() > 0.99
