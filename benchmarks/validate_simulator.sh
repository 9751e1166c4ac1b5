#!/usr/bin/env bash
# The simulator against real runs (BENCHMARKS.md, "The simulator"): for each validation
# profile and seed, the real run first (alone on the machine: do not run anything else),
# then the simulation of the same profile and seed given each worker's gradient time as
# the real run measured it. Then: python benchmarks/validate_simulator.py OUT
#   bash benchmarks/validate_simulator.sh OUT [SEEDS]       (default seeds: 1 2 3 4 5)
set -euo pipefail
out=${1:?usage: validate_simulator.sh OUT_DIR [SEEDS]}
seeds=${2:-1 2 3 4 5}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=.venv/bin/python
for seed in $seeds; do
  for p in validation4 validation; do
    sed "s/^\[run\]/[run]\nseed = $seed/" launch/profile_$p.toml > "$out/$p-s$seed.toml"
    $py -m apam_gossip bench "$out/$p-s$seed.toml" --modes centralized,decentralized -q \
        -o "$out/real-$p-s$seed.json" > /dev/null
    echo "real $p seed $seed done"
  done
done
for seed in $seeds; do
  for p in validation4 validation; do
    for mode in centralized decentralized; do
      g=$($py -c "
import json, sys
ws = json.load(open(sys.argv[1]))['runs'][sys.argv[2]]['workers']
print(', '.join(f\"{1e3 * w['compute_s'] / max(1, w['updates']):.3f}\" for w in ws))" \
          "$out/real-$p-s$seed.json" "$mode")
      cp "$out/$p-s$seed.toml" "$out/sim-$p-s$seed-$mode.toml"
      printf '\n[simulate]\ngradient_ms = [%s]\n' "$g" >> "$out/sim-$p-s$seed-$mode.toml"
      $py -m apam_gossip simulate "$out/sim-$p-s$seed-$mode.toml" --modes "$mode" -q \
          -o "$out/sim-$p-s$seed-$mode.json" > /dev/null
      echo "simulated $p seed $seed $mode"
    done
  done
done
