#!/bin/bash
# Issue 25, real runs here (BENCHMARKS.md, "Compressed gossip and neighbours chosen by speed"):
#   the one-slow-worker profile (8 workers, LeNet5 on Fashion-MNIST, 3 epochs): exact, int8
#   and top-10% gossip, 3 seeds; the slow-links profile (4 workers, 1 epoch): all-reduce,
#   exact gossip, int8, top-10% and gossip with neighbours chosen by speed, 3 seeds.
#   bash benchmarks/compressed_real.sh OUT_DIR
set -e
cd "$(dirname "$0")/.."
out=${1:?usage: compressed_real.sh OUT_DIR}
mkdir -p "$out"
.venv/bin/apam-gossip bench launch/profile_one_slow_worker.toml --seeds 3 \
  --modes decentralized,decentralized-int8,decentralized-topk -o "$out/one_slow.json"
.venv/bin/apam-gossip bench launch/profile_slow_links.toml --seeds 3 \
  --modes allreduce-amsgrad,decentralized,decentralized-int8,decentralized-topk,decentralized-fast \
  -o "$out/slow_links.json"
.venv/bin/python benchmarks/compressed_summary.py "$out/one_slow.json" "$out/slow_links.json"
