#!/usr/bin/env bash
# The simulator against real runs with its own timing (BENCHMARKS.md, issue 23): for each
# contended profile (4 and 8 workers on this machine's cores) and seed:
#   1. `bench contention` just before the real run (this VM's core speed and the factor of
#      2 co-running workers drift over minutes, so the curve and the gradient's time alone
#      are taken next to the run they are compared with, but outside it);
#   2. the real run (alone on the machine: run nothing else);
#   3. `bench --simulate` of the same profile and seed, given that curve and that gradient
#      time: nothing is taken from the real run;
#   4. the same simulation without the hardware model (no [simulate] table), as before.
# Then: python benchmarks/validate_simulator.py OUT
#   bash benchmarks/validate_simulator.sh OUT [SEEDS]       (default seeds: 1 2 3)
# Needs launch/setup.sh's .venv and Fashion-MNIST; the profiles describe a 2-core machine
# (cores_per_node = 2): on another, set cores_per_node to its cores.
set -euo pipefail
out=$(realpath -m "${1:?usage: validate_simulator.sh OUT_DIR [SEEDS]}")
seeds=${2:-1 2 3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=.venv/bin/python
for seed in $seeds; do
  for p in contended4 contended8; do
    sed "s/^\[run\]/[run]\nseed = $seed/" launch/profile_$p.toml > "$out/$p-s$seed.toml"
    $py -m apam_gossip bench contention --train-args \
        "--model lenet5 --dataset fashion-mnist --train-limit 12000 --batch-size 32" \
        | tail -1 > "$out/contention-$p-s$seed.json"
    $py -m apam_gossip bench "$out/$p-s$seed.toml" -q -o "$out/real-$p-s$seed.json" > /dev/null
    $py - "$out/contention-$p-s$seed.json" "$out/$p-s$seed.toml" "$out/sim-$p-s$seed.toml" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
curve = [1.0] + [round(max(1.0, r["factor"]), 4) for r in rows[1:]]
text = open(sys.argv[2]).read().replace(
    'contention = "measure"',
    f"contention = {curve}\ngradient_ms = {1e3 * rows[0]['batch_s']:.4f}")
open(sys.argv[3], "w").write(text)
PY
    echo "real $p seed $seed done"
  done
done
for seed in $seeds; do
  for p in contended4 contended8; do
    $py -m apam_gossip bench "$out/sim-$p-s$seed.toml" --simulate -q \
        -o "$out/sim-$p-s$seed.json" > /dev/null
    # the simulator as it was before the hardware model: no [simulate] table, every
    # worker alone on its own node, the gradient timed now
    awk '/^\[simulate\]/{skip=1; next} /^\[/{skip=0} !skip' "$out/$p-s$seed.toml" \
        > "$out/$p-s$seed-plain.toml"
    $py -m apam_gossip bench "$out/$p-s$seed-plain.toml" --simulate -q \
        -o "$out/plain-$p-s$seed.json" > /dev/null
    echo "simulated $p seed $seed"
  done
done
