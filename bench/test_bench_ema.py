"""Time and peak memory of the EMA codebook update alone at the paper's sizes (L = 400, D = 256, statistics of
3 modalities): fused, reference and naive (bench/helpers_bench.py says how). The quantizer step with it is
bench/test_bench_nearest_code.py's."""
import pytest
import torch

from helpers_bench import (
    CODES, DECAY, DEVICE, DIM, EPS, INTERPRETER_SKIP, MODALITIES, ON_GPU, bench_rounds, run_benchmark,
)
from srcid import ops
from testing.oracles import ema_update_naive

EMA_PATHS = ["fused", "reference", "naive"]


@pytest.mark.parametrize("path", EMA_PATHS)
def test_ema_update(benchmark, path):
    if path == "fused" and not ON_GPU:
        pytest.skip(INTERPRETER_SKIP)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    counts = torch.randint(0, 20, (MODALITIES, CODES), device=DEVICE, generator=gen).float()
    sums = torch.randn(MODALITIES, CODES, DIM, device=DEVICE, generator=gen) * counts[..., None]
    codebook = torch.randn(CODES, DIM, device=DEVICE, generator=gen) * 0.5
    cluster_size = torch.ones(CODES, device=DEVICE)
    embed_sum = codebook.clone()

    if path == "fused":
        from srcid.kernels import ema_update_fused_  # Triton only where the fused path runs

        def update():
            ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, decay=DECAY, eps=EPS)

    elif path == "reference":

        def update():
            ops.ema_update_reference(cluster_size, embed_sum, codebook, counts, sums, decay=DECAY, eps=EPS)

    else:

        def update():
            ema_update_naive(cluster_size, embed_sum, codebook, counts, sums, DECAY, EPS)

    info = {
        "codes": CODES, "dim": DIM, "groups": MODALITIES,
        # read the statistics and the state, write the state and the codebook (float32)
        "min_bytes": 4 * (MODALITIES * CODES * (DIM + 1) + 2 * CODES * (DIM + 1) + CODES * DIM),
    }
    run_benchmark(benchmark, update, bench_rounds(cheap=True), info)
