#!/usr/bin/env bash
# The simulator against real runs with its own timing (BENCHMARKS.md, issue 23): for each
# contended profile (4 and 8 workers on this machine's cores) and seed, the real run first
# (alone on the machine: run nothing else), then `bench --simulate` of the same profile
# and seed. The simulation times the model's gradient alone and measures the contention
# curve itself ([simulate] contention = "measure"): nothing is taken from the real run.
# Then: python benchmarks/validate_simulator.py OUT
#   bash benchmarks/validate_simulator.sh OUT [SEEDS]       (default seeds: 1 2 3)
set -euo pipefail
out=${1:?usage: validate_simulator.sh OUT_DIR [SEEDS]}
seeds=${2:-1 2 3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=.venv/bin/python
for seed in $seeds; do
  for p in contended4 contended8; do
    sed "s/^\[run\]/[run]\nseed = $seed/" launch/profile_$p.toml > "$out/$p-s$seed.toml"
    $py -m apam_gossip bench "$out/$p-s$seed.toml" -q -o "$out/real-$p-s$seed.json" > /dev/null
    echo "real $p seed $seed done"
  done
done
for seed in $seeds; do
  for p in contended4 contended8; do
    $py -m apam_gossip bench "$out/$p-s$seed.toml" --simulate -q \
        -o "$out/sim-$p-s$seed.json" > /dev/null
    # the simulator as it was before the hardware model: no [simulate] table, every
    # worker alone on its own node
    awk '/^\[simulate\]/{skip=1; next} /^\[/{skip=0} !skip' "$out/$p-s$seed.toml" \
        > "$out/$p-s$seed-plain.toml"
    $py -m apam_gossip bench "$out/$p-s$seed-plain.toml" --simulate -q \
        -o "$out/plain-$p-s$seed.json" > /dev/null
    echo "simulated $p seed $seed"
  done
done
