"""A non-editable install works without the checkout: a wheel built from the sources, installed into a fresh
virtual environment, trains (from data it synthesizes itself) and answers ``srcid study --help`` from a folder
outside the checkout, and imports srcid from that environment only.

The fresh environment reuses this interpreter's installed dependencies (torch, deepspeed, ...) through a ``.pth``
file naming their site-packages folders, instead of installing them again (gigabytes, no network). Python does not
process ``.pth`` files inside folders that a ``.pth`` file added, so the checkout's editable install, registered by
such a file there, stays out: the test checks that srcid comes from the fresh environment.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "README.md", "srcid", "kernels")  # what setup.py builds from


def run(command, cwd, env, timeout=300):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def dependency_folders() -> list:
    """This interpreter's site-packages folders (those that hold the dependencies)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def test_a_wheel_installed_into_a_fresh_environment_trains_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    # the wheel, built from a copy of the sources (the build leaves build/ and *.egg-info beside them)
    source = tmp_path / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--quiet",
         "-w", tmp_path / "wheels"], tmp_path, env)
    (wheel,) = (tmp_path / "wheels").glob("srcid-*.whl")

    # a fresh environment: no pip, no srcid; the dependencies through one .pth file
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    env).strip())
    (site / "deps.pth").write_text("".join(f"{folder}\n" for folder in dependency_folders()))
    run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", wheel], tmp_path, env)

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    where = run([python, "-c", "import srcid, srcid.run, sys; print(srcid.__file__); print(srcid.run.DS_CONFIG_DIR); "
                 "print(any('editable' in type(f).__name__.lower() or 'editable' in str(f) for f in sys.meta_path))"],
                work, env).split()
    assert Path(where[0]).is_relative_to(site) and not Path(where[0]).is_relative_to(REPO)
    assert (Path(where[1]) / "ds_config_cpu.json").is_file() and (Path(where[1]) / "ds_config_gpu.json").is_file()
    assert where[2] == "False", "the checkout's editable install leaked into the fresh environment"

    srcid = venv / "bin" / "srcid"
    run([srcid, "data", "synth", "--preset", "tiny", "--out", "data"], work, env)
    out = run([srcid, "train", "--preset", "tiny", "--max-steps", "2", "--data", "data/pretrain", "--out", "run",
               "--quiet"], work, env)
    assert (work / "run" / "model.safetensors").is_file() and "exported model:" in out
    assert "usage: srcid study" in run([srcid, "study", "--help"], work, env)
    # the trainer as the study starts it: the installed module, no launcher/ script
    assert "usage: python -m srcid.train.launch" in run([python, "-m", "srcid.train.launch", "--help"], work, env)
