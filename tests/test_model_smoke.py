"""Smoke test: the tiny SRCID model learns on the tiny synthetic data on CPU."""
import statistics

import pytest
import torch

from srcid.data.reader import ShardLoader
from srcid.data.synth import synthesize
from srcid.model import build_mi_fitter, build_model_from_manifest, model_config
from helpers_training import build_optimizer, train_step

EPOCHS = 20  # 14 steps of 16 clips each


@pytest.fixture
def one_thread():
    """Tiny tensors train fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_srcid_trains(tmp_path, one_thread):
    synthesize("tiny", tmp_path, seed=0)
    loader = ShardLoader(tmp_path / "pretrain", "train", batch_size=16, seed=0)
    torch.manual_seed(43)
    model = build_model_from_manifest("srcid", model_config("tiny"), loader.manifest)
    fitter = build_mi_fitter(model)
    optimizer = build_optimizer(model)
    history = []
    for epoch in range(EPOCHS):
        for batch in loader.epoch(epoch):
            terms = train_step(model, fitter, optimizer, batch, layer2_weight=0.3)
            history.append({k: float(v) for k, v in terms.items()})

    def mean(key, lo, hi):
        return statistics.mean(h[key] for h in history[lo:hi])

    n = len(history)
    assert n >= 250
    assert mean("loss", n - 40, n) < mean("loss", 0, 40) - 0.5
    # the MI bound rises while q_theta is first fitted, then the encoders push it down
    peak = max(mean("L1/mi", lo, lo + 40) for lo in range(0, n // 2, 20))
    assert peak > 0.05 and mean("L1/mi", n - 40, n) < 0.8 * peak
    used = [h["L1/codes_used"] for h in history[-20:]]
    assert min(used) * model_config("tiny").quantizer.codebook_size > 1
    assert all(h["L1/perplexity/audio"] > 1.0 for h in history[-20:])
