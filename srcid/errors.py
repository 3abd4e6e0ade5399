"""User-facing errors.

Everything a user can get wrong (a file, a key, a flag, a shape) raises
:class:`SrcidError` with a one-line message naming what is wrong and where.
The command line prints that line and exits non-zero, without a traceback.
"""
import os
from pathlib import Path


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


class CorruptFileError(SrcidError):
    """A file whose SHA-256 differs from the one recorded when it was written (a checkpoint file, a model)."""


def os_error_reason(error: OSError) -> str:
    """The reason of an OSError in a few words: ``Permission denied``, ``No space left on device``, ..."""
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    return reason


def write_error(path, error: OSError) -> SrcidError:
    """One line for a failed write of ``path``: ``PATH: cannot write: No space left on device``."""
    return SrcidError(f"{path}: cannot write: {os_error_reason(error)}")


def os_error_line(error: OSError) -> str:
    """One line for an OSError that reached the command line: the path it names and the reason."""
    parts = [str(p) for p in (getattr(error, "filename", None), getattr(error, "filename2", None)) if p]
    reason = os_error_reason(error)
    return f"{' -> '.join(parts)}: {reason}" if parts else reason


def check_writable_folder(folder, what: str = "--out"):
    """Create ``folder`` (and its parents) and check that a file can be created in it.

    Called before long work, so that a read-only folder, a missing or
    non-folder parent or a full inode table is one line at the start, not
    a traceback at the end. Returns the folder as a :class:`pathlib.Path`.
    """
    folder = Path(folder)
    probe = folder / f".srcid-write-check-{os.getpid()}"
    try:
        if folder.exists() and not folder.is_dir():
            raise SrcidError(f"{what} {folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as exc:
        named = str(getattr(exc, "filename", None) or folder)
        detail = "" if named in (str(folder), str(probe)) else f" ({named})"
        raise SrcidError(f"{what} {folder}: cannot write there: {os_error_reason(exc)}{detail}") from None
    return folder
