#!/bin/bash
# Issue 21 on CPU workers, side by side in one run (run from the project root):
#  1. gossip's overlap on the cluster profile where it used to cost (6 workers, slowdowns
#     3 and 9, 1 ms / 1 Gb/s links, 2 cores): measured (the default), --overlap, --no-overlap,
#     interleaved, 3 rounds;
#  2. the one-slow-worker smoke bench before (BEFORE=path of a checkout of the previous
#     commit) and after (AFTER=a checkout of this one, default the project root),
#     alternating, 2 benches per side. Use checkouts of their own (git worktree add), so
#     that editing the project meanwhile changes neither side.
set -u
AG=${AG:-.venv/bin/apam-gossip}
PY=${PY:-.venv/bin/python}
BEFORE=${BEFORE:-}
AFTER=${AFTER:-$PWD}
SKIP_OVERLAP=${SKIP_OVERLAP:-}
RES=${RES:-/tmp/issue21_cpu}; mkdir -p "$RES"
prof=(--mode decentralized --workers 6 --topology ring --model lenet5 --dataset fashion-mnist
      --steps 1200 --evals 1 --eval-samples 1000 --slowdown 3,3,3,9,9,9
      --network.latency-ms 1 --network.bandwidth-gbps 1)
[ -n "$SKIP_OVERLAP" ] || for round in 1 2 3; do
  for way in measured overlap no-overlap; do
    flag=(); [ $way = overlap ] && flag=(--overlap); [ $way = no-overlap ] && flag=(--no-overlap)
    $AG train -q "${prof[@]}" "${flag[@]}" -o "$RES/ov_${way}_$round.json" > /dev/null 2>&1
    $PY -c "
import json; r = json.load(open('$RES/ov_${way}_$round.json'))
print('round $round', '$way'.ljust(10), round(r['samples_per_s']), 'samples/s, overlap kept', [w['overlap'] for w in r['workers']])"
  done
done
if [ -n "$BEFORE" ]; then
  for k in 1 2; do
    for side in before after; do
      if [ $side = before ]; then pp=$BEFORE; else pp=$AFTER; fi
      (cd "$pp" && PYTHONPATH=$pp $OLDPWD/$PY -m apam_gossip bench launch/profile_one_slow_worker.toml \
        --smoke --modes centralized,decentralized,allreduce-amsgrad --seeds 3 -q \
        -o "$RES/slow_${side}_$k.json") > "$RES/slow_${side}_$k.log" 2>&1
      echo "one-slow-worker bench $k $side: exit $?"; tail -n 6 "$RES/slow_${side}_$k.log"
    done
  done
fi
