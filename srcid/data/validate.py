"""Old import path of :func:`check_shard_files`, now in :mod:`srcid.data.shard_format`.

Only ``srcid/train/trainer.py`` still imports it from here; remove this module once that import names
``srcid.data.shard_format``.
"""
from srcid.data.shard_format import check_shard_files

__all__ = ["check_shard_files"]
