"""Nearest code and statistics: srcid.ops' reference, and the fused kernels against it and float64 brute force.

Inputs live on the ``device`` fixture (the root conftest.py): the GPU where CUDA
is present, so the compiled kernels run, else the CPU, where the kernels run in
Triton's interpreter with 32-wide row, code and dim tiles (the sizes below
cross those edges and the GPU's 64- and 128-wide ones). Random inputs are drawn
on the CPU from a seeded generator and moved to the device, so both machines
test the same numbers. The tests taking ``cuda_device`` run only on a GPU:
every autotune config forced in turn, bfloat16 inputs, a CUDA-graph capture,
all at the paper's step sizes.

Both score precisions run: ``tf32x3`` (tensor-core candidates, float32
rescoring, IEEE sweep where the candidates cannot decide; the default) and
``ieee``. Under the interpreter the tf32x3 products are those of the tensor
cores (inputs truncated to tf32 in the kernel, products exact in float32), so
the candidate logic meets the real tf32 errors here too. The statistics do not
depend on the precision, so the deterministic mode runs with tf32x3 only in
most tests.
"""
import functools
import math

import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import deterministic_stats, nearest_code_fused
from srcid.kernels import nearest_code as nearest_module
from srcid.kernels._common import INTERPRETING
from testing.oracles import brute_nearest, first_minimum, float64_distances, float64_stats

MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]
# (precision, deterministic): statistics are the same code for both precisions
COMBOS = [
    pytest.param("tf32x3", False, id="tf32x3-atomic"),
    pytest.param("tf32x3", True, id="tf32x3-deterministic"),
    pytest.param("ieee", False, id="ieee-atomic"),
]
NAN = float("nan")
ONE_CANDIDATE, TWO_RESCORED, IEEE_SWEEP = 0, 1, 2  # row paths of the tf32x3 kernel


def fused(x, codebook, **kwargs) -> ops.NearestCode:
    """The kernel itself, with its ``deterministic`` and ``precision`` arguments; its tuple named as the op names it."""
    return ops.NearestCode(*nearest_code_fused(x, codebook, **kwargs))


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


# -- the PyTorch reference against float64 ----------------------------------------------------------------------------

def integer_grid(rows, codes, dim, generator):
    """Small-integer data: every float32 distance is exact and equal distances are common."""
    x = torch.randint(-2, 3, (rows, dim), generator=generator).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=generator).float()
    return x, codebook


@pytest.mark.parametrize("rows,codes,dim,groups", [(37, 53, 19, 1), (39, 53, 19, 3), (120, 200, 48, 3)])
def test_nearest_reference_matches_brute_force(rows, codes, dim, groups):
    gen = torch.Generator().manual_seed(rows * 1000 + codes)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    out = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=groups)
    indices, sq_dist, counts, sums = brute_nearest(x, codebook, values, groups)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.sq_dist.double(), sq_dist, rtol=1e-5, atol=1e-4)
    shape = (codes,) if groups == 1 else (groups, codes)
    assert out.counts.shape == shape and out.sums.shape == shape + (dim,)
    assert torch.equal(out.counts.double().reshape(groups, codes), counts)
    torch.testing.assert_close(out.sums.double().reshape(groups, codes, dim), sums, rtol=1e-5, atol=1e-5)


def test_nearest_reference_ties_go_to_lowest_index():
    gen = torch.Generator().manual_seed(3)
    x, codebook = integer_grid(90, 40, 5, gen)
    codebook[33] = codebook[2]  # duplicated rows: the lower index must win
    codebook[20] = codebook[7]
    out = ops.nearest_code_reference(x, codebook, stats=True)
    indices, sq_dist, counts, _ = brute_nearest(x, codebook, x, 1)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.sq_dist, sq_dist.float())
    assert out.counts[33] == 0 and out.counts[20] == 0
    dist = ((x[:, None, :] - codebook[None]) ** 2).sum(-1)
    assert ((dist == dist.min(1, keepdim=True).values).sum(1) > 1).sum() > 10  # the data really has ties


def test_nearest_reference_half_input_and_no_stats():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=gen).half()
    codebook = torch.randn(25, 16, generator=gen)
    out = ops.nearest_code_reference(x, codebook)
    indices, sq_dist, _, _ = brute_nearest(x, codebook, x, 1)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.sq_dist.double(), sq_dist, rtol=1e-5, atol=1e-4)
    assert out.counts is None and out.sums is None


def test_nearest_rejects_bad_shapes():
    with pytest.raises(SrcidError, match="codebook"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(SrcidError, match="values"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), values=torch.zeros(4, 2))
    with pytest.raises(SrcidError, match="3 equal groups"):
        ops.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), groups=3)


# -- the fused kernels ------------------------------------------------------------------------------------------------

def _shape_cases():
    """Every (precision, mode) on the small shapes; on the larger ones (slow in the interpreter) both precisions
    with atomics: the deterministic statistics cost one interpreted program per (group, code, dim tile), and
    their long, multi-dim-tile and empty slots are covered by the small shapes, by
    test_long_segments_are_summed_in_full and by test_single_row_code_or_dim. 150 x 97 crosses the GPU's 128-row
    and 64-code tiles raggedly; 128 x 256 x 64 fills every tile of every config, with several code tiles."""
    small = [(37, 53, 19, 1), (39, 53, 19, 3)]
    cases = [pytest.param(*shape, *combo.values, id="-".join(map(str, shape)) + "-" + combo.id)
             for shape in small for combo in COMBOS]
    cases += [pytest.param(150, 97, 64, 3, "tf32x3", False, id="150-97-64-3-tf32x3-atomic"),
              pytest.param(150, 97, 64, 3, "ieee", False, id="150-97-64-3-ieee-atomic"),
              pytest.param(128, 256, 64, 1, "tf32x3", False, id="128-256-64-1-tf32x3-atomic")]
    return cases


@pytest.mark.parametrize("rows,codes,dim,groups,precision,deterministic", _shape_cases())
def test_matches_brute_force_and_reference(rows, codes, dim, groups, precision, deterministic, device):
    gen = torch.Generator().manual_seed(rows + codes + dim)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    codebook[codes // 2 :] += 6.0  # half the codes sit far away: no row picks them
    values = torch.randn(rows, dim, generator=gen) * 3.0 + 1.0
    x, codebook, values = x.to(device), codebook.to(device), values.to(device)
    out = fused(x, codebook, values=values, stats=True, groups=groups, deterministic=deterministic,
                precision=precision)
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


@pytest.mark.parametrize("precision,deterministic", COMBOS)
def test_ties_go_to_lowest_index(precision, deterministic, device):
    """Small-integer data: every float32 score is exact, so ties are exact and common."""
    gen = torch.Generator().manual_seed(21)
    rows, codes, dim = 90, 77, 5
    x = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=gen).float()
    codebook[70] = codebook[3]  # duplicates in a later code tile (tiles of 32)
    codebook[40] = codebook[35]  # duplicate in the same tile
    codebook[64] = codebook[10]  # duplicate at a tile's first position
    out = fused(x.to(device), codebook.to(device), stats=True, deterministic=deterministic,
                precision=precision)
    dist = float64_distances(x, codebook)
    tied_rows = (dist == dist.min(1, keepdim=True).values).sum(1) > 1
    assert tied_rows.sum() > 10
    check_exact(out, x, codebook, x, 1)
    assert out.counts[70] == 0 and out.counts[40] == 0 and out.counts[64] == 0
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), stats=True)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)


# duplicated codes whose copies sit in different code tiles: 32-wide (interpreter) and 64- and 128-wide (GPU)
TILE_STRADDLING_DUPLICATES = [(10, 70), (5, 130), (31, 32), (63, 64), (127, 128), (40, 149), (96, 97)]


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_ties_across_code_tile_boundaries_go_to_lowest_index(precision, device):
    """Exact ties between copies of one code in different code tiles: the lowest index wins, as
    the first minimum of the float64 distances (the later tile must not replace an equal score).
    Atomic statistics only: the mode does not take part in choosing the code, and the deterministic
    statistics of exact ties are test_ties_go_to_lowest_index's."""
    gen = torch.Generator().manual_seed(140)
    rows, codes, dim = 75, 150, 7  # 150 codes: a ragged last tile of every width
    x = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=gen).float() * 2.0 + 0.5  # no other duplicates likely
    for row, (low, high) in enumerate(TILE_STRADDLING_DUPLICATES):
        codebook[high] = codebook[low]
        x[2 * row] = codebook[high]  # rows on the copies: distance 0 to both, ties for sure
        x[2 * row + 1] = codebook[high] + 0.25
    out = fused(x.to(device), codebook.to(device), values=x.flip(0).to(device), stats=True,
                groups=3, deterministic=False, precision=precision)
    check_exact(out, x, codebook, x.flip(0), 3)
    for row, (low, high) in enumerate(TILE_STRADDLING_DUPLICATES):
        assert out.indices[2 * row] == low and out.indices[2 * row + 1] == low and out.sq_dist[2 * row] == 0
        assert torch.all(out.counts[:, high] == 0)
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), values=x.flip(0).to(device), stats=True, groups=3)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)
    assert torch.equal(out.indices.cpu(), torch.argmin(float64_distances(x, codebook), dim=1))


@pytest.mark.parametrize("precision,deterministic", COMBOS)
@pytest.mark.parametrize(
    "rows,codes,dim,groups",
    [(1, 1, 1, 1), (1, 37, 5, 1), (37, 1, 5, 1), (37, 45, 1, 1), (3, 1, 1, 3), (1, 40, 33, 1)],
    ids=["N1-L1-D1", "N1", "L1", "D1", "L1-D1-one-row-per-group", "N1-two-dim-tiles"],
)
def test_single_row_code_or_dim(rows, codes, dim, groups, precision, deterministic, device):
    gen = torch.Generator().manual_seed(rows * 100 + codes * 10 + dim)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    values = torch.randn(rows, dim, generator=gen)
    out = fused(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=groups,
                deterministic=deterministic, precision=precision)
    check_against_brute_force(out, x, codebook, values, groups, tie_tol=1e-4)
    if codes == 1:
        assert torch.all(out.indices == 0)
        assert torch.equal(out.counts.reshape(groups).cpu(), torch.full((groups,), rows / groups))
    ref = ops.nearest_code_reference(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=groups)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_rows_far_from_every_code(precision, device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(45, 24, generator=gen) * 0.5 + 40.0
    codebook = torch.randn(60, 24, generator=gen) * 2.0
    out = fused(x.to(device), codebook.to(device), values=(x * 2).to(device), stats=True, groups=3,
                precision=precision)
    check_against_brute_force(out, x, codebook, x * 2, 3, tie_tol=1e-5)
    assert torch.all(out.sq_dist > 1e4)


@pytest.mark.parametrize("precision,deterministic", COMBOS)
def test_half_precision_and_strided_inputs(precision, deterministic, device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(19, 66, generator=gen).half().to(device).t()  # [66, 19], column-major
    values = torch.randn(66, 19, generator=gen).to(device=device, dtype=torch.bfloat16)
    codebook = torch.randn(19, 40, generator=gen).to(device).t()  # strided float32 codebook [40, 19]
    assert not x.is_contiguous() and not codebook.is_contiguous()
    out = fused(x, codebook, values=values, stats=True, groups=3, deterministic=deterministic,
                precision=precision)
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


@pytest.mark.parametrize("precision,deterministic", COMBOS[:2])  # ieee: strides in test_half_precision_and_strided_inputs
def test_non_contiguous_and_expanded_inputs(precision, deterministic, device):
    gen = torch.Generator().manual_seed(77)
    for name, x, codebook, values in _layouts(gen, device):
        assert not x.is_contiguous() or not codebook.is_contiguous() or not values.is_contiguous(), name
        assert 0 in x.stride() + codebook.stride() + values.stride() or name.startswith("sliced"), name
        out = fused(x, codebook, values=values, stats=True, deterministic=deterministic,
                    precision=precision)
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
        # the same numbers, contiguous: the same result (the nearest-code kernel's loads: once, with atomics)
        if not deterministic:
            dense = fused(x.contiguous(), codebook.contiguous(), values=values.contiguous(), stats=True,
                          deterministic=False, precision=precision)
            assert torch.equal(out.indices, dense.indices) and torch.equal(out.counts, dense.counts), name


@pytest.mark.parametrize("precision,deterministic", COMBOS)
def test_nan_rows_values_and_codes_follow_the_reference(precision, deterministic, device):
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

    out = fused(x.to(device), codebook.to(device), values=values.to(device), stats=True, groups=2,
                deterministic=deterministic, precision=precision)
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
    out = fused(clean_x.to(device), bad_book.to(device), stats=True, deterministic=deterministic,
                precision=precision)
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
    first = fused(x.to(device), codebook.to(device), stats=True, groups=3, deterministic=deterministic)
    check_against_brute_force(first, x, codebook, x, 3, tie_tol=1e-4)
    assert torch.all(first.counts[:, 2] > 40)
    second = fused(x.to(device), codebook.to(device), stats=True, groups=3, deterministic=deterministic)
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
    fused(x, codebook, stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "0")
    fused(x, codebook, stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "maybe")
    with pytest.raises(SrcidError, match="SRCID_DETERMINISTIC"):
        fused(x, codebook, stats=True)


def test_bad_inputs_are_clear_errors(device):
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    with pytest.raises(SrcidError, match=r"x \(4, 3\) and codebook \(5, 2\)"):
        ops.nearest_code(zeros(4, 3), zeros(5, 2), impl="fused")
    with pytest.raises(SrcidError, match="no codes"):
        ops.nearest_code(zeros(4, 3), zeros(0, 3), impl="fused")
    with pytest.raises(SrcidError, match="2 equal groups"):
        ops.nearest_code(zeros(5, 3), zeros(4, 3), groups=2, impl="fused")
    with pytest.raises(SrcidError, match="floating-point"):
        ops.nearest_code(zeros(4, 3, dtype=torch.int64), zeros(5, 3), impl="fused")


def test_empty_batch(device):
    out = fused(torch.zeros(0, 7, device=device), torch.randn(5, 7, device=device), stats=True, groups=3)
    assert out.indices.shape == (0,) and out.counts.shape == (3, 5) and out.sums.shape == (3, 5, 7)
    assert torch.all(out.counts == 0) and torch.all(out.sums == 0)


# -- tf32x3: tensor-core candidates, exact argmin --------------------------------------------------------------------


def tf32(t):
    """float32 ``t`` with its mantissa truncated to tf32's 10 explicit bits, as the kernel does."""
    return (t.float().contiguous().view(torch.int32) & -8192).view(torch.float32)


def tf32x3_parts(t):
    """The kernel's split: ``hi = tf32(t)``, ``lo = tf32(t - hi)`` (float32)."""
    hi = tf32(t)
    return hi, tf32(t.float() - hi)


def tf32x3_scores64(x, codebook):
    """The approximate scores of the tf32x3 kernel with exact sums (float64): ``||c||^2 - 2 (x_hi.c_hi + x_hi.c_lo
    + x_lo.c_hi)``. Every product of tf32 numbers is exact, so only the kernel's float32 sums differ from this."""
    (xh, xl), (ch, cl) = tf32x3_parts(x), tf32x3_parts(codebook)
    xh, xl, ch, cl = (t.double() for t in (xh, xl, ch, cl))
    return (codebook.double() ** 2).sum(1)[None] - 2.0 * (xh @ ch.T + xh @ cl.T + xl @ ch.T)


def tf32_scores64(x, codebook):
    """Scores from inputs truncated to tf32 once (what a plain tf32 tensor-core argmin would rank), in float64."""
    return (codebook.double() ** 2).sum(1)[None] - 2.0 * (tf32(x).double() @ tf32(codebook).double().T)


def first_index(scores):
    return first_minimum(scores)[1]


def score_bound64(x, codebook):
    """The kernel's per-row bound on |approximate - exact score| (:func:`tf32x3_score_bound`), in float64."""
    bound = nearest_module.tf32x3_score_bound(x.shape[1])
    x_len, c_max = x.double().norm(dim=1), codebook.double().norm(dim=1).max()
    return bound.xc * x_len * c_max + bound.cc * c_max * c_max + bound.absolute * (1 + x_len + c_max)


def clear_paths(x, codebook):
    """Rows whose tf32x3 path is certain from the float64 scores (``Bnd`` the kernel's bound, the approximate scores
    within ``Bnd / 2`` of them): a second code within ``Bnd`` of the best and no third within ``3 Bnd`` (two
    candidates, rescored), or no second within ``3 Bnd`` (one candidate)."""
    scores = (codebook.double() ** 2).sum(1)[None] - 2.0 * x.double() @ codebook.double().T
    k = min(3, codebook.shape[0])
    lowest = torch.cat([scores.topk(k, dim=1, largest=False).values,
                        torch.full((x.shape[0], 3 - k), float("inf"), dtype=torch.float64, device=x.device)], 1)
    bnd = score_bound64(x, codebook)
    sure_two = (lowest[:, 1] - lowest[:, 0] < bnd) & (lowest[:, 2] - lowest[:, 0] > 3 * bnd)
    sure_one = lowest[:, 1] - lowest[:, 0] > 3 * bnd
    return sure_two, sure_one


def run_tf32x3(x, codebook, device, **kwargs):
    """``(out, row_paths)`` of the tf32x3 kernel on ``device``."""
    paths = torch.full((x.shape[0],), -1, dtype=torch.int32, device=device)
    out = ops.NearestCode(*nearest_module._nearest_code(x.to(device), codebook.to(device), precision="tf32x3",
                                                        row_paths=paths, **kwargs))
    return out, paths.cpu()


def near_tie_rows(codebook, rows, gen, gaps=(1e-5, 1e-3), pairs=()):
    """Rows each nearly equidistant from two codes ``a`` and ``b``: their midpoint, plus noise orthogonal to
    ``c_a - c_b``, moved along ``c_a - c_b`` so that the squared distances differ by ``gap * ||x|| ||c_a||`` with
    ``gap`` log-uniform in ``gaps`` and a random sign. ``pairs`` fixes the codes of the first rows."""
    codes, dim = codebook.shape
    a = torch.randint(0, codes, (rows,), generator=gen)
    b = (a + torch.randint(1, codes, (rows,), generator=gen)) % codes
    for i, (p, q) in enumerate(pairs[:rows]):
        a[i], b[i] = p, q
    delta = codebook[a] - codebook[b]
    mid = (codebook[a] + codebook[b]) / 2
    noise = torch.randn(rows, dim, generator=gen) * 0.3
    noise -= (noise * delta).sum(1, keepdim=True) / (delta * delta).sum(1, keepdim=True) * delta
    lo, hi = math.log10(gaps[0]), math.log10(gaps[1])
    gap = 10 ** (lo + (hi - lo) * torch.rand(rows, generator=gen))
    sign = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
    scale = (mid + noise).norm(dim=1) * codebook[a].norm(dim=1)
    t = sign * gap * scale / (2 * (delta * delta).sum(1))
    return mid + noise + t[:, None] * delta


@pytest.mark.parametrize(
    "rows,codes,dim",
    [(97, 150, 45), (1, 130, 33), (64, 129, 1)],
    ids=["ragged", "N1", "D1"],
)
def test_tf32x3_near_ties_where_tf32_flips_the_argmin(rows, codes, dim, device):
    """Near-ties (gaps 1e-5 to 1e-3 of ||x|| ||c||) between code pairs, some straddling 32-, 64- and 128-wide code
    tiles. Truncating the inputs to tf32 flips the float64 argmin on many rows; tf32x3 returns the float64 first
    minimum on every row whose float64 gap is clear of float32 rounding, mostly by rescoring two candidates."""
    gen = torch.Generator().manual_seed(rows * 7 + codes + dim)
    codebook = torch.randn(codes, dim, generator=gen)
    pairs = [(31, 32), (63, 64), (127, 128), (10, 70), (5, 129)]
    x = near_tie_rows(codebook, rows, gen, pairs=[p for p in pairs if p[1] < codes])
    values = torch.randn(rows, dim, generator=gen)
    dist = float64_distances(x, codebook)
    best, indices = first_minimum(dist)
    if rows >= 32:  # the test can fail: a tensor-core argmin of truncated inputs is often wrong here
        flipped = first_index(tf32_scores64(x, codebook)) != indices
        assert flipped.sum() >= rows // 10
    out, paths = run_tf32x3(x, codebook, device, values=values.to(device), stats=True)
    # gaps of at least 1e-5 ||x|| ||c|| against float32 errors of about 1e-7 of it: every row is clear
    check_against_brute_force(out, x, codebook, values, 1, tie_tol=1e-6)
    assert torch.equal(out.indices.cpu(), indices)
    sure_two, sure_one = clear_paths(x, codebook)
    assert torch.all(paths[sure_two] == TWO_RESCORED) and torch.all(paths[sure_one] == ONE_CANDIDATE)
    if rows >= 32 and dim > 1:  # the window is about 1e-4 of ||x|| ||c|| at these dims: many rows in it
        assert sure_two.sum() >= rows // 5 and (paths == IEEE_SWEEP).sum() <= rows // 10
    ieee = fused(x.to(device), codebook.to(device), precision="ieee")
    assert torch.equal(ieee.indices, out.indices)


def tf32x3_flip_grid(gen, candidates=60000):
    """Data on which float32 is exact and the tf32x3 approximation reverses close pairs of codes.

    ``D = 2``, entries ``1 + k 2^-11`` (integers ``k`` in [0, 121]): ``x_hi = 1 + (k // 2) 2^-10``,
    ``x_lo = (k % 2) 2^-11``, and tf32x3 drops ``x_lo c_lo``, so a code's approximate score is its exact score plus
    up to ``4 * 2^-22``. Every float32 product, sum and score here is a multiple of ``2^-22`` below 4 in size:
    exact. Codes sit on a 20-unit grid (random parities); rows near the midpoints of neighbouring codes, so that
    exactly two codes are within the kernel's bound of the best. Returns ``(x, codebook, rows)``: the rows whose
    approximate first minimum differs from the exact one, and which have exactly two candidates (with margin)."""
    unit = 2.0 ** -11
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"), -1).reshape(-1, 2) * 20
    code_units = grid + torch.randint(0, 2, grid.shape, generator=gen)
    a = torch.randint(0, 5, (candidates,), generator=gen) * 6 + torch.randint(0, 6, (candidates,), generator=gen)
    b = a + 6  # the neighbour along the first axis
    move = torch.stack([torch.randint(-1, 2, (candidates,), generator=gen),
                        torch.randint(-6, 7, (candidates,), generator=gen)], 1)
    x_units = torch.div(code_units[a] + code_units[b], 2, rounding_mode="floor") + move
    codebook = 1 + code_units.float() * unit
    x = 1 + x_units.float() * unit
    exact = (codebook.double() ** 2).sum(1)[None] - 2.0 * x.double() @ codebook.double().T
    approx = tf32x3_scores64(x, codebook)
    flipped = first_index(approx) != first_index(exact)
    lowest = approx.topk(3, dim=1, largest=False).values
    window = 2 * score_bound64(x, codebook)
    two = (lowest[:, 1] - lowest[:, 0] < window / 1.5) & (lowest[:, 2] - lowest[:, 0] > window * 1.5)
    return x, codebook, torch.nonzero(flipped & two).squeeze(1)


def test_tf32x3_rescoring_decides_where_the_approximation_is_wrong(device):
    """Rows whose tf32x3 approximate scores rank two codes in the wrong order, on data where float32 is exact:
    the kernel rescores both and returns the exact first minimum, bit for bit, distances included."""
    gen = torch.Generator().manual_seed(2024)
    x, codebook, flipped = tf32x3_flip_grid(gen)
    assert len(flipped) >= 20
    keep = torch.cat([flipped[:48], torch.arange(40)])  # and some ordinary rows of the same grid
    x = x[keep]
    exact = (codebook * codebook).sum(1)[None] - 2.0 * (x @ codebook.T)  # float32: exact on this data
    assert torch.equal(exact.double(), (codebook.double() ** 2).sum(1)[None] - 2.0 * x.double() @ codebook.double().T)
    out, paths = run_tf32x3(x, codebook, device, values=x.to(device), stats=True, groups=2)
    check_exact(out, x, codebook, x, 2)
    assert torch.all(paths[: min(48, len(flipped))] == TWO_RESCORED)


def test_tf32x3_duplicated_codes_across_tile_edges(device):
    """Gaussian codebook with copies of codes in other 32-, 64- and 128-wide code tiles; rows next to a copy.
    Two copies: both are candidates, their float32 scores are equal and the lower index wins. Three copies: more
    than two candidates, so the row tile takes the IEEE sweep, which also keeps the lowest index."""
    gen = torch.Generator().manual_seed(31)
    rows, codes, dim = 100, 150, 37  # 8 tied rows: check_against_brute_force wants 90% clear
    codebook = torch.randn(codes, dim, generator=gen)
    x = torch.randn(rows, dim, generator=gen)
    twos = [(10, 70), (5, 130), (31, 32), (63, 64), (127, 128), (40, 149), (96, 97)]
    for row, (low, high) in enumerate(twos):
        codebook[high] = codebook[low]
        x[row] = codebook[high] + 0.05 * torch.randn(dim, generator=gen)
    codebook[100] = codebook[120] = codebook[80]  # three copies
    x[40] = codebook[120] + 0.05 * torch.randn(dim, generator=gen)
    out, paths = run_tf32x3(x, codebook, device, values=x.to(device), stats=True)
    dist = float64_distances(x, codebook)
    best, indices = first_minimum(dist)
    second = dist.topk(2, dim=1, largest=False).values[:, 1]
    assert torch.all((second == best) | (second - best > 1e-4 * (1 + best)))  # exact ties (copies) or clear
    assert torch.equal(out.indices.cpu(), indices)
    torch.testing.assert_close(out.sq_dist.cpu().double(), best, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.counts.cpu().double(), float64_stats(indices, x, 1, codes)[0][0])
    for row, (low, high) in enumerate(twos):
        assert out.indices[row] == low and paths[row] == TWO_RESCORED and out.counts[high] == 0
    assert out.indices[40] == 80 and paths[40] == IEEE_SWEEP
    assert (paths == ONE_CANDIDATE).sum() > rows // 2


@pytest.mark.parametrize("spread", [1.0, 8.0])
def test_tf32x3_large_norm_rows(spread, device):
    """Rows and codes around a common offset of norm 1e3: the bound (about 1e-5 of ||x|| ||c|| ~ 1e6 here) covers
    many codes when they are 1 apart, so those rows take the IEEE sweep; 8 apart, two candidates at most.
    Indices equal the float64 first minimum wherever its gap exceeds float32 rounding of scores ~1e6."""
    gen = torch.Generator().manual_seed(int(spread))
    rows, codes, dim = 45, 60, 24
    offset = torch.randn(dim, generator=gen)
    offset *= 1e3 / offset.norm()
    codebook = offset + spread * torch.randn(codes, dim, generator=gen)
    near = torch.randint(0, codes, (rows,), generator=gen)
    x = codebook[near] + 0.3 * spread * torch.randn(rows, dim, generator=gen)
    x[::3] = near_tie_rows(codebook, rows, gen, gaps=(1e-6, 1e-4))[::3]
    out, paths = run_tf32x3(x, codebook, device, values=x.to(device), stats=True, groups=3)
    dist = float64_distances(x, codebook)
    best, indices = first_minimum(dist)
    scale = (x.double() ** 2).sum(1) + (codebook.double() ** 2).sum(1).max()
    tol = 4e-6 * scale  # float32 scores of size ~ scale, summed over 24 dims
    second = dist.topk(2, dim=1, largest=False).values[:, 1]
    clear = second - best > tol
    assert clear.float().mean() > 0.6
    got = out.indices.cpu()
    assert torch.equal(got[clear], indices[clear])
    assert torch.all(dist.gather(1, got[:, None]).squeeze(1) <= best + tol)
    assert torch.all((out.sq_dist.cpu().double() - best).abs() <= tol)
    counts, _ = float64_stats(got, x, 3, codes)
    assert torch.equal(out.counts.cpu().double(), counts)
    if spread == 1.0:
        assert (paths == IEEE_SWEEP).sum() > rows // 2
    else:
        assert (paths == IEEE_SWEEP).sum() < rows // 4
    ieee = fused(x.to(device), codebook.to(device), precision="ieee")
    assert torch.equal(ieee.indices.cpu()[clear], got[clear])
    if INTERPRETING:  # the same 32-wide tiles in the sweep: the same float32 numbers
        swept = paths == IEEE_SWEEP
        assert torch.equal(ieee.indices.cpu()[swept], got[swept])
        assert torch.equal(ieee.sq_dist.cpu()[swept], out.sq_dist.cpu()[swept])


def test_tf32x3_non_finite_and_huge_inputs_take_the_ieee_sweep(device):
    """Rows with inf, NaN or norms that could overflow a score, and codes with inf: no bound is claimed there, so
    those rows (or all, for a bad code) take the IEEE sweep and get what the ieee precision returns."""
    gen = torch.Generator().manual_seed(66)
    rows, codes, dim = 40, 45, 9
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    x[3, 2] = float("inf")
    x[4, 0] = -float("inf")
    x[5, 1] = NAN
    x[6] *= 1e19  # ||x||^2 overflows float32
    x[37] *= 1e-30  # ||x||^2 underflows to 0: the bound allows for it; the row's scores are ||c||^2
    out, paths = run_tf32x3(x, codebook, device)
    ieee = fused(x.to(device), codebook.to(device), precision="ieee")
    assert torch.equal(out.indices, ieee.indices)
    torch.testing.assert_close(out.sq_dist, ieee.sq_dist, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.all(paths[[3, 4, 5, 6]] == IEEE_SWEEP)
    finite = torch.ones(rows, dtype=torch.bool)
    finite[[3, 4, 5, 6]] = False
    assert torch.equal(out.indices.cpu()[finite], first_minimum(float64_distances(x[finite], codebook))[1])
    bad_book = codebook.clone()
    bad_book[20, 3] = float("inf")
    out, paths = run_tf32x3(x[finite], bad_book, device)
    ieee = fused(x[finite].to(device), bad_book.to(device), precision="ieee")
    assert torch.equal(out.indices, ieee.indices) and torch.all(paths == IEEE_SWEEP)
    # everything tiny: products underflow, every score is 0, all codes tie: the sweep keeps code 0
    out, paths = run_tf32x3(x[finite] * 1e-25, codebook * 1e-25, device)
    assert torch.all(out.indices == 0) and torch.all(paths == IEEE_SWEEP)


@pytest.mark.parametrize("dim", [1, 7, 64, 256])
def test_tf32x3_error_budget(dim):
    """The measured error of the tf32x3 scores against the bound the kernel uses.

    Float64 from the split parts isolates the split's own error (kept products exact): at most ``3 * 2^-20`` of
    ``sum |x_k c_k|`` (checked on data built to approach it). The kernel's float32 arithmetic (the approximate
    scores as two float32 accumulators, the exact ones as float32 x @ c.T) must stay within
    ``xc ||x|| ||c|| + cc ||c||^2``, which includes a safety factor 2: observed below half of it. Plain tf32
    (inputs truncated once) errs up to ``2^-9`` of ``||x|| ||c||``, some 100x more, which is why the kernel
    splits."""
    gen = torch.Generator().manual_seed(dim)
    bound = nearest_module.tf32x3_score_bound(dim)
    assert 0 < bound.xc < 1e-3 and 0 < bound.cc < 1e-3 and 0 < bound.absolute < 1e-20
    worst_split = worst_kernel = worst_tf32 = 0.0
    offset = torch.randn(dim, generator=gen) * 3
    most_dropped = 1.0 + (2.0 ** 13 - 1) * 2.0 ** -23  # every truncated bit set: the largest split errors
    data = [
        (torch.randn(160, dim, generator=gen), torch.randn(120, dim, generator=gen)),
        (offset + 0.1 * torch.randn(160, dim, generator=gen), offset + 0.1 * torch.randn(120, dim, generator=gen)),
        (torch.randn(160, dim, generator=gen) * torch.logspace(-3, 3, dim),
         torch.randn(120, dim, generator=gen) * 1e2),
        (torch.full((30, dim), most_dropped) * (1 + torch.arange(30)[:, None] % 7) / 4,
         torch.full((20, dim), most_dropped) * (1 + torch.arange(20)[:, None] % 5) / 2),
    ]
    for x, codebook in data:
        exact64 = (codebook.double() ** 2).sum(1)[None] - 2.0 * x.double() @ codebook.double().T
        products = x.double().abs() @ codebook.double().abs().T
        norms = x.double().norm(dim=1)[:, None] * codebook.double().norm(dim=1)[None]
        worst_split = max(worst_split, float(((tf32x3_scores64(x, codebook) - exact64).abs() / (2 * products)).max()))
        worst_tf32 = max(worst_tf32, float(((tf32_scores64(x, codebook) - exact64).abs() / (2 * norms)).max()))
        # the kernel's float32 arithmetic: approximate and exact scores
        (xh, xl), (ch, cl) = tf32x3_parts(x), tf32x3_parts(codebook)
        c_norm = (codebook * codebook).sum(1)[None]
        approx = c_norm - 2.0 * (xh @ ch.T + (xh @ cl.T + xl @ ch.T))
        exact = c_norm - 2.0 * (x @ codebook.T)
        c_len = codebook.double().norm(dim=1)[None]
        allowed = bound.xc * norms + bound.cc * c_len ** 2
        worst_kernel = max(worst_kernel, float(((approx.double() - exact.double()).abs() / allowed).max()))
    assert 1e-7 < worst_split <= 3 * 2.0 ** -20
    assert worst_split > 2.0 ** -21  # the adversarial data comes near the split's bound
    assert worst_kernel < 0.5  # the safety factor 2 is not used up
    assert worst_tf32 > 2.0 ** -11 and worst_tf32 > 50 * worst_split


def test_precision_selection(monkeypatch, device):
    """``precision=`` on the call, else ``SRCID_NEAREST_PRECISION``, else tf32x3; other values are clear errors."""
    launched = []

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.real[grid]

    monkeypatch.setattr(nearest_module, "_nearest_code_kernel", Spy("ieee", nearest_module._nearest_code_kernel))
    monkeypatch.setattr(nearest_module, "_nearest_code_tc_kernel", Spy("tf32x3", nearest_module._nearest_code_tc_kernel))
    x, codebook = torch.randn(6, 3, device=device), torch.randn(4, 3, device=device)
    monkeypatch.delenv("SRCID_NEAREST_PRECISION", raising=False)
    assert nearest_module.nearest_precision() == "tf32x3"
    fused(x, codebook)
    ops.nearest_code(x, codebook, impl="fused")
    assert launched == ["tf32x3", "tf32x3"]
    monkeypatch.setenv("SRCID_NEAREST_PRECISION", "IEEE ")
    assert nearest_module.nearest_precision() == "ieee"
    fused(x, codebook)
    ops.nearest_code(x, codebook, impl="fused", stats=True)
    fused(x, codebook, precision="tf32x3")  # the call wins over the variable
    assert launched[2:] == ["ieee", "ieee", "tf32x3"]
    monkeypatch.setenv("SRCID_NEAREST_PRECISION", "tf32")
    with pytest.raises(SrcidError, match=r"SRCID_NEAREST_PRECISION='tf32': use one of ieee, tf32x3"):
        fused(x, codebook)
    fused(x, codebook, precision="ieee")  # a valid argument does not read the variable
    with pytest.raises(SrcidError, match=r"precision='bf16'"):
        fused(x, codebook, precision="bf16")
    with pytest.raises(SrcidError, match="row_paths"):
        nearest_module._nearest_code(x, codebook, precision="ieee", row_paths=torch.zeros(6, dtype=torch.int32,
                                                                                               device=device))
    assert launched[5:] == ["ieee"]


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


def _run_paper_checks(device, deterministic, precision):
    for (rows, codes, dim) in PAPER_SHAPES:
        for exact in (True, False):
            x, codebook, values = _paper_case(rows, codes, dim, exact, device.type)
            groups = 3 if rows % 3 == 0 else 7  # 1001 rows: 7 groups of 143
            out = fused(x, codebook, values=values, stats=True, groups=groups, deterministic=deterministic,
                        precision=precision)
            where = f"{rows}x{codes}x{dim} exact={exact}"
            if exact:
                check_exact(out, x, codebook, values, groups)
            else:
                check_against_brute_force(out, x, codebook, values, groups, tie_tol=1e-4)
            plain = fused(x, codebook, deterministic=deterministic, precision=precision)
            assert torch.equal(plain.indices, out.indices), where


@functools.lru_cache(maxsize=None)
def _paper_near_ties(rows, codes, dim, device_type):
    """Paper-size rows at near-ties (gaps 1e-6 to 1e-3 of ||x|| ||c||) between Gaussian codes, on the GPU."""
    gen = torch.Generator().manual_seed(rows * 3 + codes + dim)
    codebook = torch.randn(codes, dim, generator=gen)
    x = near_tie_rows(codebook, rows, gen, gaps=(1e-6, 1e-3), pairs=[(63, 64), (127, 128), (255, 256), (10, 300)])
    return x.to(device_type), codebook.to(device_type)


def _run_tf32x3_paper_checks(device, deterministic):
    """The checks of every precision, and the tf32x3 specifics at paper sizes: near-ties where tf32 flips the
    argmin, the rows' paths (few IEEE sweeps on Gaussian data), agreement with the ieee precision."""
    _run_paper_checks(device, deterministic, "tf32x3")
    for (rows, codes, dim) in PAPER_SHAPES:
        x, codebook = _paper_near_ties(rows, codes, dim, device.type)
        paths = torch.full((rows,), -1, dtype=torch.int32, device=device)
        out = ops.NearestCode(*nearest_module._nearest_code(x, codebook, values=x, stats=True,
                                                            groups=7 if rows == 1001 else 3,
                                                            deterministic=deterministic, precision="tf32x3",
                                                            row_paths=paths))
        dist = float64_distances(x, codebook)
        best, indices = first_minimum(dist)
        flipped = first_index(tf32_scores64(x, codebook)) != indices
        assert flipped.float().mean() > 0.05
        second = dist.topk(2, dim=1, largest=False).values[:, 1]
        clear = second - best > 1e-6 * (1 + best)
        assert torch.equal(out.indices[clear], indices[clear])
        assert torch.all(dist.gather(1, out.indices[:, None]).squeeze(1) <= best + 1e-6 * (1 + best))
        sure_two, sure_one = clear_paths(x, codebook)
        assert torch.all(paths[sure_two] == TWO_RESCORED) and torch.all(paths[sure_one] == ONE_CANDIDATE)
        assert (paths == IEEE_SWEEP).float().mean() < 0.02 and torch.all(paths >= 0)
        ieee = fused(x, codebook, precision="ieee")
        assert torch.equal(ieee.indices[clear], out.indices[clear])
        # plain Gaussian rows: almost all decided by the tensor cores (one candidate, or two rescored)
        x, codebook, _ = _paper_case(rows, codes, dim, False, device.type)
        paths.fill_(-1)
        nearest_module._nearest_code(x, codebook, precision="tf32x3", row_paths=paths)
        assert (paths == IEEE_SWEEP).float().mean() < 0.01 and torch.all(paths >= 0)


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("config_index", _config_params(nearest_module._nearest_code_kernel))
def test_every_gpu_config_of_the_nearest_code_kernel_at_paper_sizes(config_index, deterministic, cuda_device,
                                                                     forced_config):
    tuner = nearest_module._nearest_code_kernel
    with forced_config(tuner, tuner.configs[config_index]):
        _run_paper_checks(cuda_device, deterministic, "ieee")


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("config_index", _config_params(nearest_module._nearest_code_tc_kernel))
def test_every_gpu_config_of_the_tf32x3_kernel_at_paper_sizes(config_index, deterministic, cuda_device,
                                                              forced_config):
    tuner = nearest_module._nearest_code_tc_kernel
    with forced_config(tuner, tuner.configs[config_index]):
        _run_tf32x3_paper_checks(cuda_device, deterministic)


@pytest.mark.parametrize("config_index", _config_params(nearest_module._segment_sum_kernel))
def test_every_gpu_config_of_the_segment_sum_kernel_at_paper_sizes(config_index, cuda_device, forced_config):
    tuner = nearest_module._segment_sum_kernel
    with forced_config(tuner, tuner.configs[config_index]):
        _run_paper_checks(cuda_device, True, "tf32x3")


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("rows", [2400, 7680])
def test_bfloat16_inputs_at_paper_sizes(rows, deterministic, precision, cuda_device):
    gen = torch.Generator().manual_seed(rows)
    x, codebook, values = (torch.randn(n, 256, generator=gen).to(cuda_device, torch.bfloat16) for n in (rows, 400, rows))
    out = fused(x, codebook, values=values, stats=True, groups=3, deterministic=deterministic,
                precision=precision)
    # the float64 brute force of the bfloat16 numbers (exactly representable in float32 and float64)
    check_against_brute_force(out, x, codebook, values, 3, tie_tol=1e-4)
    ref = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=3)
    assert (out.indices == ref.indices).float().mean() > 0.99
