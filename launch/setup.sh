#!/usr/bin/env bash
# Set up .venv for apam_gossip: quick and CPU-only on a fresh machine, GPU-friendly elsewhere.
#
#   bash launch/setup.sh          # .venv with torch, apam_gossip (editable), test tools
#
# torch: if the venv already has a torch (e.g. a CUDA build), it is kept. Otherwise
# $APAM_TORCH_SPEC is installed (default torch==2.13.0: on this project's machines that
# resolves to a local CPU wheel; an unpinned torch would pull the newest CUDA build and
# ~19 nvidia packages). Elsewhere, e.g.:
#   APAM_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" bash launch/setup.sh
# Fashion-MNIST: as root with apt-get, installs Debian's dataset-fashion-mnist (31 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    "${PIP[@]}" ${APAM_TORCH_SPEC:-torch==2.13.0}
fi
# Pin the torch now installed, so no dependency (a newer torchvision, say) can swap it for
# another build: pip then picks the torchvision release made for this torch.
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/constraints.txt
"${PIP[@]}" -c .venv/constraints.txt -e ".[test,mpi,log]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
        || echo "note: could not apt-get install dataset-fashion-mnist; fashion-mnist runs need --data-dir" >&2
fi
echo "apam_gossip ready: .venv/bin/apam-gossip"
