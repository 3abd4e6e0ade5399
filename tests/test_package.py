"""The package installs under its own names and the console command answers --help."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_import_path_outside_the_repository(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import srcid.kernels, sys; print(srcid.kernels.__file__); import importlib.util as u; print(u.find_spec('kernels'))"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert Path(out[0]).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert out[1] == "None", "no generic top-level module named 'kernels' may be installed"


def test_cli_help_for_every_command():
    from srcid.cli import build_parser

    parser = build_parser()
    subactions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    commands = list(subactions[0].choices)
    assert "data" in commands
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "srcid.cli", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
