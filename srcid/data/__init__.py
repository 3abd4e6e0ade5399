"""Feature datasets: the manifest, shard writing, reading, validation, synthesis and import."""
