"""The EMA codebook update: srcid.ops' reference, and the fused kernels against it and a float64 formula.

Inputs live on the ``device`` fixture (the GPU where CUDA is present, else the
CPU under Triton's interpreter); the float64 formula runs on CPU copies. The
tests taking ``cuda_device`` run only on a GPU: every autotune config of both
kernels at the paper's codebook size, and a whole nearest-code + EMA step
captured in a CUDA graph.
"""
import functools

import pytest
import torch

from srcid import ops
from srcid.errors import SrcidError
from srcid.kernels import ema_update_fused_, nearest_code_fused
from srcid.kernels import ema as ema_module
from testing.oracles import ema_float64

MODES = [pytest.param(False, id="atomic"), pytest.param(True, id="deterministic")]


def random_state(codes, dim, groups, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    cluster_size = torch.rand(codes, generator=gen) * 5.0
    embed_sum = torch.randn(codes, dim, generator=gen)
    counts = torch.randint(0, 9, (groups, codes), generator=gen).float()
    counts[:, ::7] = 0.0  # codes no row picked this step
    sums = torch.randn(groups, codes, dim, generator=gen) * counts[..., None]
    return [t.to(device) for t in (cluster_size, embed_sum, counts, sums)]


def check_float64(state, want, rtol=1e-5, atol=1e-6):
    for got, w in zip(state, want):
        torch.testing.assert_close(got.cpu().double(), w, rtol=rtol, atol=atol)


# -- the PyTorch reference against float64 ----------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 3])
def test_ema_reference_matches_float64(groups):
    gen = torch.Generator().manual_seed(11 + groups)
    codes, dim = 53, 19
    cluster_size = torch.rand(codes, generator=gen) * 4
    embed_sum = torch.randn(codes, dim, generator=gen)
    counts = torch.randint(0, 6, (groups, codes), generator=gen).float()
    counts[:, :5] = 0  # codes no row picked
    sums = torch.randn(groups, codes, dim, generator=gen)
    if groups == 1:
        counts, sums = counts[0], sums[0]
    state = [cluster_size.clone(), embed_sum.clone(), torch.zeros(codes, dim)]
    ops.ema_update_reference(*state, counts, sums, decay=0.99, eps=1e-5)
    expected = ema_float64(cluster_size, embed_sum, counts, sums, 0.99, 1e-5)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# -- the fused kernels ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "codes,dim,groups",
    [(53, 19, 1), (53, 19, 3), (17, 70, 2), (1, 1, 1), (1, 1, 3), (37, 1, 2), (1, 45, 2)],
    ids=["53x19-G1", "53x19-G3", "17x70-G2", "L1-D1-G1", "L1-D1-G3", "D1", "L1"],
)
def test_matches_reference_and_float64(codes, dim, groups, device):
    cluster_size, embed_sum, counts, sums = random_state(codes, dim, groups, seed=codes + dim + groups, device=device)
    if groups == 1:
        counts, sums = counts[0], sums[0]
    fused = [cluster_size.clone(), embed_sum.clone(), torch.full((codes, dim), 7.0, device=device)]
    ref = [cluster_size.clone(), embed_sum.clone(), torch.full((codes, dim), 7.0, device=device)]
    ema_update_fused_(*fused, counts, sums, decay=0.99, eps=1e-5)
    ops.ema_update_reference(*ref, counts, sums, decay=0.99, eps=1e-5)
    want = ema_float64(cluster_size, embed_sum, counts, sums, 0.99, 1e-5)
    for got, expected in zip(fused, ref):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    check_float64(fused, want)


def test_after_nearest_code_statistics_and_repeated_steps(device):
    """Three steps of fused nearest code + update, the fused update against the reference."""
    gen = torch.Generator().manual_seed(4)
    codes, dim, rows = 40, 24, 90
    codebook = torch.randn(codes, dim, generator=gen).to(device)
    state_f = [torch.zeros(codes, device=device), codebook.clone(), codebook.clone()]
    state_r = [torch.zeros(codes, device=device), codebook.clone(), codebook.clone()]
    for _ in range(3):
        x = torch.randn(rows, dim, generator=gen).to(device)
        stats = ops.nearest_code(x, state_r[2], stats=True, groups=3, impl="fused")
        want = ema_float64(*state_f[:2], stats.counts, stats.sums, 0.9, 1e-5)
        ema_update_fused_(*state_f, stats.counts, stats.sums, decay=0.9, eps=1e-5)
        ops.ema_update_reference(*state_r, stats.counts, stats.sums, decay=0.9, eps=1e-5)
        for got, expected in zip(state_f, state_r):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        check_float64(state_f, want)
        state_f[2].copy_(state_r[2])  # keep both paths on the same assignments next step


def test_strided_state_and_dispatch(device):
    codes, dim, groups = 30, 20, 3
    cluster_size, embed_sum, counts, sums = random_state(codes, dim, groups, seed=5, device=device)
    embed_t = embed_sum.t().contiguous().t()  # column-major, same values
    book_t = torch.zeros(dim, codes, device=device).t()
    size_strided = torch.zeros(codes * 2, device=device)[::2]
    size_strided.copy_(cluster_size)
    assert not embed_t.is_contiguous() and not book_t.is_contiguous() and not size_strided.is_contiguous()
    ops.ema_update_(size_strided, embed_t, book_t, counts, sums.transpose(1, 2).contiguous().transpose(1, 2),
                    decay=0.95, eps=1e-3, impl="fused")
    check_float64((size_strided, embed_t, book_t), ema_float64(cluster_size, embed_sum, counts, sums, 0.95, 1e-3))


def test_expanded_statistics_and_sliced_state(device):
    """Statistics as stride-0 views (the same counts for every group, sums constant along dims) and the
    state as windows of wider buffers: read and written through their strides."""
    codes, dim, groups = 45, 21, 3
    gen = torch.Generator().manual_seed(6)
    counts = torch.randint(0, 9, (1, codes), generator=gen).float().to(device).expand(groups, codes)
    sums = (torch.randn(groups, codes, 1, generator=gen) * 4).to(device).expand(groups, codes, dim)
    assert counts.stride(0) == 0 and sums.stride(2) == 0
    size_buf = torch.zeros(3, codes, device=device)
    embed_buf = torch.zeros(2 * codes, dim + 4, device=device)
    book_buf = torch.full((codes + 2, dim + 3), -9.0, device=device)
    size, embed, book = size_buf[1], embed_buf[::2, 2 : 2 + dim], book_buf[1 : 1 + codes, :dim]
    size.copy_(torch.rand(codes, generator=gen) * 3)
    embed.copy_(torch.randn(codes, dim, generator=gen))
    start = (size.clone(), embed.clone())
    ema_update_fused_(size, embed, book, counts, sums, decay=0.9, eps=1e-4)
    check_float64((size, embed, book), ema_float64(*start, counts, sums, 0.9, 1e-4))
    # the buffers around the windows are untouched
    assert torch.all(size_buf[0] == 0) and torch.all(size_buf[2] == 0)
    assert torch.all(embed_buf[1::2] == 0) and torch.all(embed_buf[::2, :2] == 0) and torch.all(embed_buf[::2, 2 + dim :] == 0)
    assert torch.all(book_buf[0] == -9) and torch.all(book_buf[1 + codes :] == -9) and torch.all(book_buf[:, dim:] == -9)


def test_bad_inputs_are_clear_errors(device):
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    size, embed, book = zeros(5), zeros(5, 3), zeros(5, 3)
    update = functools.partial(ops.ema_update_, decay=0.9, eps=1e-5, impl="fused")
    with pytest.raises(SrcidError, match=r"counts \(4,\) and sums \(4, 3\)"):
        update(size, embed, book, zeros(4), zeros(4, 3))
    with pytest.raises(SrcidError, match=r"cluster_size \(6,\)"):
        update(zeros(6), embed, book, zeros(5), zeros(5, 3))
    with pytest.raises(SrcidError, match="counts must be float32"):
        update(size, embed, book, zeros(5, dtype=torch.int64), zeros(5, 3))
    with pytest.raises(SrcidError, match=r"codebook \(5,\)"):
        update(size, embed, zeros(5), zeros(5), zeros(5, 3))


# -- compiled kernels only (CUDA) -----------------------------------------------------------------

def _config_params():
    """(kernel, config index) for every config of both EMA kernels (on a CPU: the interpreter's, skipped)."""
    return [
        pytest.param(name, i, id=name.strip("_") + "-" + "-".join(f"{k}{v}" for k, v in c.all_kwargs().items()))
        for name in ("_cluster_size_kernel", "_embed_kernel")
        for i, c in enumerate(getattr(ema_module, name).configs)
    ]


@pytest.mark.parametrize("kernel,config_index", _config_params())
def test_every_gpu_config_of_the_ema_kernels_at_paper_sizes(kernel, config_index, cuda_device, forced_config):
    tuner = getattr(ema_module, kernel)
    with forced_config(tuner, tuner.configs[config_index]):
        for codes, dim, groups in [(400, 256, 3), (400, 256, 1), (397, 250, 3), (2500, 33, 2)]:
            cluster_size, embed_sum, counts, sums = random_state(codes, dim, groups, seed=codes + dim, device=cuda_device)
            state = [cluster_size.clone(), embed_sum.clone(), torch.zeros(codes, dim, device=cuda_device)]
            ema_update_fused_(*state, counts, sums, decay=0.99, eps=1e-5)
            check_float64(state, ema_float64(cluster_size, embed_sum, counts, sums, 0.99, 1e-5))


@pytest.mark.parametrize("deterministic", MODES)
def test_cuda_graph_replays_a_nearest_code_and_ema_step_like_eager(deterministic, cuda_device):
    """One step (nearest code with statistics for 3 modalities, then the EMA update) captured in a CUDA
    graph after a warm-up call that tunes every kernel, replayed from the same state: the eager result."""
    rows, codes, dim = 2400, 400, 256
    gen = torch.Generator().manual_seed(2400)
    x = torch.randn(rows, dim, generator=gen).to(cuda_device)
    next_x = torch.randn(rows, dim, generator=gen).to(cuda_device)
    start = [(torch.rand(codes, generator=gen) * 5).to(cuda_device), torch.randn(codes, dim, generator=gen).to(cuda_device)]
    start.append(start[1] / (start[0][:, None] + 1.0))
    state = [t.clone() for t in start]

    def step():
        out = ops.NearestCode(*nearest_code_fused(x, state[2], stats=True, groups=3, deterministic=deterministic))
        ema_update_fused_(*state, out.counts, out.sums, decay=0.99, eps=1e-5)
        return out

    def reset():
        for s, s0 in zip(state, start):
            s.copy_(s0)

    def eager_step():
        reset()
        out = step()
        torch.cuda.synchronize()
        return [t.clone() for t in out], [s.clone() for s in state]

    side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    want_out, want_state = eager_step()

    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for s, s0 in zip(state, start):
        assert torch.equal(s, s0)  # capturing runs nothing
    for inputs, (expected_out, expected_state) in [(x.clone(), (want_out, want_state)), (next_x, None)]:
        x.copy_(inputs)
        if expected_state is None:  # new rows in the captured input buffer
            expected_out, expected_state = eager_step()
        reset()
        graph.replay()
        torch.cuda.synchronize()
        got_out, got_state = list(captured), list(state)
        assert torch.equal(got_out[0], expected_out[0]) and torch.equal(got_out[1], expected_out[1])
        assert torch.equal(got_out[2], expected_out[2])
        if deterministic:  # sums and the update are bitwise reproducible
            assert torch.equal(got_out[3], expected_out[3])
            for got, want in zip(got_state, expected_state):
                assert torch.equal(got, want)
        else:  # float atomics: the sums' last bits follow the order of additions
            torch.testing.assert_close(got_out[3], expected_out[3], rtol=1e-5, atol=1e-5)
            for got, want in zip(got_state, expected_state):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the eager step is the reference step
    ref = ops.nearest_code_reference(next_x, start[2], stats=True, groups=3)
    assert (ref.indices == expected_out[0]).float().mean() > 0.99
