"""Reader throughput: one epoch of a few thousand clips through :class:`ShardLoader` with 2 workers."""
import numpy as np
import pytest

from srcid.data.reader import ShardLoader
from srcid.data.shards import DatasetWriter

CLIPS = 3000
BATCH = 80
MODALITIES = {
    "audio": ([10, 128], "float16"),  # VGGish segments
    "video": ([10, 512], "float16"),  # pooled VGG19 segments
    "text": ([None, 768], "float16"),  # BERT tokens, 8..32 per clip
}


@pytest.fixture(scope="session")
def bench_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-reader") / "ds"
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, name="bench", modalities=MODALITIES, classes=[f"c{i}" for i in range(28)],
                       tasks=["pretrain"], max_samples_per_shard=500) as writer:
        for i in range(CLIPS):
            features = {
                "audio": rng.standard_normal((10, 128), dtype=np.float32),
                "video": rng.standard_normal((10, 512), dtype=np.float32),
                "text": rng.standard_normal((int(rng.integers(8, 33)), 768), dtype=np.float32),
            }
            label = int(rng.integers(28))
            meta = {"label": label, "segments": {"audio": [[label]] * 10, "video": [[label]] * 10}, "caption": f"clip {i}"}
            writer.write("train", f"clip{i:05d}", features, meta)
    return folder


def test_reader_throughput_two_workers(benchmark, bench_dataset):
    loader = ShardLoader(bench_dataset, "train", batch_size=BATCH, num_workers=2, seed=0)
    epochs = iter(range(1000))

    def one_epoch():
        return sum(len(batch) for batch in loader.epoch(next(epochs)))

    read = benchmark.pedantic(one_epoch, rounds=3, iterations=1, warmup_rounds=1)
    assert read == CLIPS
    benchmark.extra_info["samples_per_s"] = round(CLIPS / benchmark.stats.stats.mean, 1)
    benchmark.extra_info["clips"] = CLIPS
    benchmark.extra_info["batch_size"] = BATCH
    benchmark.extra_info["num_workers"] = 2
