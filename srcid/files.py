"""Files written whole or not at all, and JSON read with a one-line error.

Every file the project writes (checkpoints' small files, the exported
model and its sidecar, manifests, evaluation results, the metrics CSV) goes
through :func:`write_atomic`: the bytes go to a temporary name beside the
target, are flushed and fsynced, and the temporary file is renamed over the
target, so a reader sees the old file or the new one, never half of one.
Every JSON file the project reads goes through :func:`read_json_object`,
which reports a missing, unreadable or malformed file as one line naming
it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from srcid.errors import SrcidError, os_error_reason, write_error


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fsync_path(path) -> None:
    """fsync a file or a folder by path (works for files written by other processes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes | str, *, sync_folder: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync and ``os.replace``.

    Creates the parent folder. An OSError becomes one line naming ``path``
    (``PATH: cannot write: No space left on device``); the temporary file
    never outlives the call. With ``sync_folder`` the folder's entry is
    fsynced too, so the rename itself survives a power cut.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_path(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path, data, *, indent: int = 2, sort_keys: bool = False, allow_nan: bool = False,
                      default=None, sync_folder: bool = False) -> Path:
    """Write ``data`` as JSON (one trailing newline) with :func:`write_atomic`."""
    try:
        text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    except (TypeError, ValueError) as exc:
        raise SrcidError(f"{path}: cannot write as JSON: {one_line(exc)}") from None
    return write_atomic(path, text + "\n", sync_folder=sync_folder)


def read_json_object(path, *, error: type[SrcidError] = SrcidError, missing: str = "file not found") -> dict:
    """Read a JSON object from ``path``; anything else is one line of ``error`` naming the file.

    ``missing`` is the message for a file that does not exist (say what
    should have written it).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON ({one_line(exc)})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {os_error_reason(exc)}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object, found {type(data).__name__}")
    return data
