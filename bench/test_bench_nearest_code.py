"""Time and peak memory of one quantizer step at the paper's sizes: nearest code with statistics for all
modalities, then the EMA update; fused, reference and naive (bench/helpers_bench.py says how)."""
import pytest
import torch

from helpers_bench import (
    CODES, DECAY, DEVICE, DIM, EPS, INTERPRETER_SKIP, MODALITIES, ON_GPU, STEPS, bench_rounds, run_benchmark,
)
from srcid import ops
from testing.oracles import ema_update_naive, nearest_code_naive

NEAREST_PATHS = ["fused", "fused-deterministic", "reference", "naive"]


@pytest.mark.parametrize("clips", [80, 256])
@pytest.mark.parametrize("path", NEAREST_PATHS)
def test_nearest_code_ema_step(benchmark, path, clips):
    if path.startswith("fused") and not ON_GPU:
        pytest.skip(INTERPRETER_SKIP)
    rows = clips * STEPS * MODALITIES
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, DIM, device=DEVICE, generator=gen)
    values = torch.randn(rows, DIM, device=DEVICE, generator=gen)
    codebook = torch.randn(CODES, DIM, device=DEVICE, generator=gen) * 0.5
    cluster_size = torch.ones(CODES, device=DEVICE)
    embed_sum = codebook.clone()

    if path.startswith("fused"):
        from srcid.kernels import ema_update_fused_, nearest_code_fused  # Triton only where the fused path runs

        deterministic = path == "fused-deterministic"

        def step():
            _, _, counts, sums = nearest_code_fused(x, codebook, values=values, stats=True, groups=MODALITIES,
                                                    deterministic=deterministic)
            ema_update_fused_(cluster_size, embed_sum, codebook, counts, sums, decay=DECAY, eps=EPS)

    elif path == "reference":

        def step():
            out = ops.nearest_code_reference(x, codebook, values=values, stats=True, groups=MODALITIES)
            ops.ema_update_reference(cluster_size, embed_sum, codebook, out.counts, out.sums, decay=DECAY, eps=EPS)

    else:

        def step():
            _, counts, sums = nearest_code_naive(x, codebook, values, MODALITIES)
            ema_update_naive(cluster_size, embed_sum, codebook, counts, sums, DECAY, EPS)

    info = {
        "rows": rows, "codes": CODES, "dim": DIM, "groups": MODALITIES,
        "flops_distance": 2 * rows * CODES * DIM,
        "min_bytes": 4 * (2 * rows * DIM + CODES * DIM) + 12 * rows + 4 * MODALITIES * CODES * (DIM + 1),
        "dense_nl_bytes": 4 * rows * CODES,
    }
    run_benchmark(benchmark, step, bench_rounds(cheap=True), info)
