"""The ``srcid`` command line.

Each command group lives in its own module with a ``register(subparsers)``
function; this file only assembles them and turns a :class:`SrcidError` into
one line on stderr and a non-zero exit (exit status 2, 1 for a data error),
as it does an ``OSError`` that escaped the commands' own checks (a full disk,
a folder made read-only mid-run): the path and the reason, exit status 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from srcid import __version__
from srcid.errors import SrcidError, os_error_line
from srcid.run import use_kernels

# command-group modules, in the order `srcid --help` lists them
COMMAND_MODULES = [
    "srcid.data.commands",
    "srcid.train.commands",
    "srcid.eval.commands",
    "srcid.study.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srcid", description="SRCID: one discrete codebook shared by audio, video and text.")
    parser.add_argument("--version", action="version", version=f"srcid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "passes_extra_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
    try:
        use_kernels(args)
        result = args.func(args)
    except SrcidError as exc:
        print(f"srcid: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"srcid: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("srcid: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
