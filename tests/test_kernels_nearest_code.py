"""The fused nearest-code kernel against srcid.ops' reference and float64 brute force.

Runs in Triton's interpreter on CPU (tests/conftest.py), where the kernel
uses 32-wide row, code and dim tiles, so the sizes below cross tile edges.
"""
import numpy as np
import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import deterministic_stats, nearest_code_fused
from srcid.kernels import nearest_code as nearest_module

MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]


def brute_force(x, codebook, values, groups):
    """float64 distances; the lowest index among the minima; counts and sums row by row."""
    x64, cb64, v64 = x.double(), codebook.double(), values.double()
    dist = ((x64[:, None, :] - cb64[None, :, :]) ** 2).sum(-1)
    best = dist.min(1, keepdim=True).values
    indices = np.array([int(np.flatnonzero(row == row.min())[0]) for row in dist.numpy()])
    num_codes = codebook.shape[0]
    counts = np.zeros((groups, num_codes))
    sums = np.zeros((groups, num_codes, x.shape[1]))
    per_group = x.shape[0] // groups
    for row, code in enumerate(indices):
        counts[row // per_group, code] += 1
        sums[row // per_group, code] += v64[row].numpy()
    return dist.numpy(), best.squeeze(1).numpy(), indices, counts, sums


def check_against_brute_force(out, x, codebook, values, groups, tie_tol):
    """Indices equal the brute force wherever the best code wins by more than ``tie_tol``;
    elsewhere the chosen code is within ``tie_tol`` of the best. Counts exact, sums to float32 tolerance."""
    dist, best, indices, _, _ = brute_force(x, codebook, values, groups)
    got = out.indices.numpy()
    second = np.partition(dist, 1, axis=1)[:, 1]
    clear = (second - best) > tie_tol * (1 + best)
    assert clear.mean() > 0.9
    assert np.array_equal(got[clear], indices[clear])
    assert np.all(dist[np.arange(len(got)), got] <= best + tie_tol * (1 + best))
    np.testing.assert_allclose(out.sq_dist.numpy(), best, rtol=1e-5, atol=1e-3)
    # statistics of the kernel's own assignment, exactly as a float64 loop over rows computes them
    num_codes, dim = codebook.shape
    per_group = x.shape[0] // groups
    counts = np.zeros((groups, num_codes))
    sums = np.zeros((groups, num_codes, dim))
    for row, code in enumerate(got):
        counts[row // per_group, code] += 1
        sums[row // per_group, code] += values[row].double().numpy()
    shape = (num_codes,) if groups == 1 else (groups, num_codes)
    assert out.counts.shape == shape and out.sums.shape == shape + (dim,)
    assert out.counts.dtype == torch.float32 and out.sums.dtype == torch.float32
    assert np.array_equal(out.counts.numpy().reshape(groups, num_codes), counts)
    np.testing.assert_allclose(out.sums.numpy().reshape(groups, num_codes, dim), sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("rows,codes,dim,groups", [(37, 53, 19, 1), (39, 53, 19, 3), (150, 97, 64, 3), (256, 256, 64, 1)])
def test_matches_brute_force_and_reference(rows, codes, dim, groups, deterministic):
    gen = torch.Generator().manual_seed(rows + codes + dim)
    x = torch.randn(rows, dim, generator=gen)
    codebook = torch.randn(codes, dim, generator=gen)
    codebook[codes // 2 :] += 6.0  # half the codes sit far away: no row picks them
    values = torch.randn(rows, dim, generator=gen) * 3.0 + 1.0
    out = nearest_code_fused(x, codebook, values=values, stats=True, groups=groups, deterministic=deterministic)
    check_against_brute_force(out, x, codebook, values, groups, tie_tol=1e-4)
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
def test_ties_go_to_lowest_index(deterministic):
    """Small-integer data: every float32 score is exact, so ties are exact and common."""
    gen = torch.Generator().manual_seed(21)
    rows, codes, dim = 90, 77, 5
    x = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    codebook = torch.randint(-1, 2, (codes, dim), generator=gen).float()
    codebook[70] = codebook[3]  # duplicates in a later code tile (tiles of 32)
    codebook[40] = codebook[35]  # duplicate in the same tile
    codebook[64] = codebook[10]  # duplicate at a tile's first position
    out = nearest_code_fused(x, codebook, stats=True, deterministic=deterministic)
    dist, best, indices, counts, sums = brute_force(x, codebook, x, 1)
    tied_rows = (np.isclose(dist, best[:, None], rtol=0, atol=0)).sum(1) > 1
    assert tied_rows.sum() > 10
    assert np.array_equal(out.indices.numpy(), indices)
    assert np.array_equal(out.sq_dist.numpy(), best.astype(np.float32))
    assert np.array_equal(out.counts.numpy(), counts[0])
    assert np.array_equal(out.sums.numpy(), sums[0].astype(np.float32))
    assert out.counts[70] == 0 and out.counts[40] == 0 and out.counts[64] == 0
    ref = ops.nearest_code_reference(x, codebook, stats=True)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.counts, ref.counts)


def test_rows_far_from_every_code():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(45, 24, generator=gen) * 0.5 + 40.0
    codebook = torch.randn(60, 24, generator=gen) * 2.0
    out = nearest_code_fused(x, codebook, values=x * 2, stats=True, groups=3)
    check_against_brute_force(out, x, codebook, x * 2, 3, tie_tol=1e-5)
    assert torch.all(out.sq_dist > 1e4)


@pytest.mark.parametrize("deterministic", MODES)
def test_half_precision_and_strided_inputs(deterministic):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(19, 66, generator=gen).half().t()  # [66, 19], column-major
    values = torch.randn(66, 19, generator=gen).to(torch.bfloat16)
    codebook = torch.randn(19, 40, generator=gen).t()  # strided float32 codebook [40, 19]
    assert not x.is_contiguous() and not codebook.is_contiguous()
    out = nearest_code_fused(x, codebook, values=values, stats=True, groups=3, deterministic=deterministic)
    check_against_brute_force(out, x, codebook, values, 3, tie_tol=1e-4)
    ref = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=3)
    assert (out.indices == ref.indices).float().mean() > 0.95


def test_without_stats_and_through_ops():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(33, 20, generator=gen)
    codebook = torch.randn(35, 20, generator=gen)
    out = ops.nearest_code(x, codebook, impl="fused")
    assert out.counts is None and out.sums is None
    assert out.indices.dtype == torch.int64 and out.sq_dist.dtype == torch.float32
    ref = ops.nearest_code(x, codebook, impl="reference")
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.sq_dist, ref.sq_dist, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("deterministic", MODES)
def test_long_segments_are_summed_in_full(deterministic):
    """Most rows pick one code: its segment spans several row blocks of the segment-sum kernel."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(150, 40, generator=gen)
    codebook = torch.randn(6, 40, generator=gen) + 4.0
    codebook[2] = 0.0
    first = nearest_code_fused(x, codebook, stats=True, groups=3, deterministic=deterministic)
    check_against_brute_force(first, x, codebook, x, 3, tie_tol=1e-4)
    assert torch.all(first.counts[:, 2] > 40)
    second = nearest_code_fused(x, codebook, stats=True, groups=3, deterministic=deterministic)
    if deterministic:
        assert torch.equal(first.sums, second.sums) and torch.equal(first.counts, second.counts)


def test_mode_selection(monkeypatch):
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
    nearest_code_fused(torch.randn(6, 3), torch.randn(4, 3), stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "0")
    nearest_code_fused(torch.randn(6, 3), torch.randn(4, 3), stats=True)
    assert used == [1]
    monkeypatch.setenv("SRCID_DETERMINISTIC", "maybe")
    with pytest.raises(SrcidError, match="SRCID_DETERMINISTIC"):
        nearest_code_fused(torch.randn(6, 3), torch.randn(4, 3), stats=True)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(SrcidError, match=r"x \(4, 3\) and codebook \(5, 2\)"):
        nearest_code_fused(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(SrcidError, match="no codes"):
        nearest_code_fused(torch.zeros(4, 3), torch.zeros(0, 3))
    with pytest.raises(SrcidError, match="2 equal groups"):
        nearest_code_fused(torch.zeros(5, 3), torch.zeros(4, 3), groups=2)
    with pytest.raises(SrcidError, match="floating-point"):
        nearest_code_fused(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(5, 3))


def test_empty_batch():
    out = nearest_code_fused(torch.zeros(0, 7), torch.randn(5, 7), stats=True, groups=3)
    assert out.indices.shape == (0,) and out.counts.shape == (3, 5) and out.sums.shape == (3, 5, 7)
    assert torch.all(out.counts == 0) and torch.all(out.sums == 0)
