#!/usr/bin/env bash
# The one-slow-worker profile, centralized, with 1 and 2 master shards, 3 seeds, K = 1 and
# K = 2 taking turns by seed (issue 24; BENCHMARKS.md, "A sharded APAM master", 5):
#   bash benchmarks/sharded_one_slow.sh [OUT_DIR]      (default runs/sharded-one-slow)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/sharded-one-slow}
mkdir -p "$out"
for seed in 1 2 3; do
  for k in 1 2; do
    p="$out/k$k-s$seed"
    sed "s/^\[run\]/[run]\nseed = $seed\nmaster_shards = $k/" \
        launch/profile_one_slow_worker.toml > "$p.toml"
    .venv/bin/python -m apam_gossip bench "$p.toml" --modes centralized -q -o "$p.json" \
        > /dev/null
    .venv/bin/python - "$p.json" "$k" "$seed" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["runs"]["centralized"]
print(f"shards {sys.argv[2]} seed {sys.argv[3]}: final accuracy {r['final_accuracy']:.4f}, "
      f"{r['samples_per_s']:.0f} samples/s")
PY
  done
done
