#!/bin/bash
# loop API, centralized, 3 workers (tests/loop_script.py: a 2,442-entry MLP on digits), 300 steps each;
# K = 1, 2 with and without every worker taking a state_dict() every 10 steps; samples/s from the result
cd "$(dirname "$0")/.."
for round in 1 2; do
for k in 1 2; do for save in 0 10; do
  n=$((3 + k))
  .venv/bin/python -m apam_gossip launch -n $n --timeout 200 tests/loop_script.py --mode centralized --master-shards $k \
     --steps 300 --save-every $save --result "${TMPDIR:-/tmp}/loop_sharded.json" > /dev/null 2>&1 || echo FAIL
  .venv/bin/python -c "import json;d=json.load(open('${TMPDIR:-/tmp}/loop_sharded.json'));print('round $round K=$k save_every=$save', round(d['samples_per_s']), 'samples/s', d['updates'], 'updates', 'acc', round(d['final_accuracy'],4))"
done; done; done
