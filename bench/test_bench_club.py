"""Time and peak memory of CLUB forward + backward (the MI loss ``mean(positive - negative)``) at the paper's
shapes: fused, reference, the naive all-pairs form and the sampled estimator (bench/helpers_bench.py says how)."""
import pytest
import torch

from helpers_bench import DEVICE, INTERPRETER_SKIP, ON_GPU, STEPS, bench_rounds, run_benchmark
from srcid import ops
from testing.oracles import club_all_pairs_bytes, club_naive, club_sample

CLUB_SHAPES = {
    # [modality, layer, time, clips, D]: the per-step estimators of audio and text, both layers
    "steps-80clips-256": (2, 2, STEPS, 80, 256),
    "steps-256clips-256": (2, 2, STEPS, 256, 256),
    # [layer, time, clips, D]: video's 512-d specific features
    "steps-80clips-512": (2, STEPS, 80, 512),
    # every row of a step pooled into one estimator
    "pooled-2400-256": (2400, 256),
    "pooled-7680-256": (7680, 256),
    "pooled-7680-512": (7680, 512),
}
CLUB_PATHS = ["fused", "reference", "naive-all-pairs", "club-sample"]
NAIVE_TEMPORARIES = 4  # pair tensors alive at once in forward + backward of the naive form


def _naive_budget():
    if ON_GPU:
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free), "80% of free GPU memory"
    return 2 * 1024**3, "2 GiB on CPU, where larger pair tensors take minutes per round"


@pytest.mark.parametrize("case", list(CLUB_SHAPES))
@pytest.mark.parametrize("path", CLUB_PATHS)
def test_club_forward_backward(benchmark, path, case):
    shape = CLUB_SHAPES[case]
    if path == "fused" and not ON_GPU:
        pytest.skip(INTERPRETER_SKIP)
    pair_bytes = club_all_pairs_bytes(shape)
    if path == "naive-all-pairs":
        budget, why = _naive_budget()
        if NAIVE_TEMPORARIES * pair_bytes > budget:
            pytest.skip(
                f"the N x N x D pair tensor of {shape} is {pair_bytes / 2**30:.1f} GiB; "
                f"{NAIVE_TEMPORARIES} of them exceed the budget ({why})"
            )
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    mu, logvar, y = (torch.randn(shape, device=DEVICE, generator=gen).requires_grad_() for _ in range(3))

    if path == "fused":
        from srcid.kernels import club_loglik_fused  # Triton only where the fused path runs

        terms = lambda: club_loglik_fused(mu, logvar, y)[:2]
    elif path == "reference":
        terms = lambda: ops.club_loglik_reference(mu, logvar, y)[:2]
    elif path == "naive-all-pairs":
        terms = lambda: club_naive(mu, logvar, y)[:2]
    else:
        terms = lambda: club_sample(mu, logvar, y)

    def forward_backward():
        positive, negative = terms()
        torch.autograd.grad((positive - negative).mean(), (mu, logvar, y))

    numel = mu.numel()
    info = {
        "shape": list(shape),
        "min_bytes": 4 * (3 * numel + 3 * numel),  # read mu, logvar, y; write their gradients
        "pair_tensor_bytes": pair_bytes,
    }
    cheap = path != "naive-all-pairs" and (ON_GPU or numel <= 2_000_000)
    run_benchmark(benchmark, forward_backward, bench_rounds(cheap), info)
