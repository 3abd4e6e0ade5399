"""User-facing errors.

Everything a user can get wrong (a file, a key, a flag, a shape) raises
:class:`SrcidError` with a one-line message naming what is wrong and where.
The command line prints that line and exits non-zero, without a traceback.
"""


class SrcidError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class DataError(SrcidError):
    """Bad dataset content: a shard, sample or manifest that breaks the format."""

    exit_code = 1

    def __init__(self, message, *, shard=None, key=None, member=None):
        where = ", ".join(
            f"{name} {value}" for name, value in (("shard", shard), ("key", key), ("member", member)) if value is not None
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.shard, self.key, self.member = shard, key, member
