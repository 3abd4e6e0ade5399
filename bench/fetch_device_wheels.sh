#!/usr/bin/env bash
# Run HERE, where PyPI can be reached: put into .whl/ the packages that the GPU machine lacks, for
# its Python 3.12 on manylinux x86_64, at the versions of this repository's .venv (the ones the
# tests pass with). bench/device_check.sh installs them there offline (pip --no-index --no-deps
# --target /tmp/site); the device run must name .whl in `carry` (.whl/ is git-ignored).
#
#   bash bench/fetch_device_wheels.sh           (PYTHON=.venv/bin/python, WHEEL_DIR=.whl)
#
# The GPU image has torch, triton, numpy, pytest, tqdm, pyyaml, msgpack, einops, ninja, psutil,
# py-cpuinfo and nvidia-ml-py; it lacks deepspeed (and its hjson and pydantic)
# and webdataset (and its braceexpand). deepspeed is published as an sdist only: it is built here
# into a pure-Python wheel with DS_BUILD_OPS=0 (no compiled ops; the trainer uses torch's Adam),
# which needs torch in PYTHON. If that build fails, its sdist is fetched instead and the device
# check builds it there the same way (--no-build-isolation, DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}
# typing-extensions is in the image, but pydantic-core may need a newer one than the image's
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

version_of() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$DEST"
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$(version_of "$name")")
done
platform_flags=()
for p in "${PLATFORMS[@]}"; do
  platform_flags+=(--platform "$p")
done
echo "fetching ${pins[*]} for CPython 3.12 manylinux x86_64 into $DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platform_flags[@]}" -d "$DEST" "${pins[@]}"

deepspeed="deepspeed==$(version_of deepspeed)"
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  echo "building $deepspeed into a pure-Python wheel (DS_BUILD_OPS=0)"
  if ! DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
      -w "$DEST" "$deepspeed"; then
    echo "the wheel build failed: fetching the sdist for the device to build"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "$deepspeed"
  fi
fi

ls -l "$DEST"
du -sh "$DEST"
echo "carry it: run(command='bash bench/device_check.sh', carry=['.whl'], ...)"
