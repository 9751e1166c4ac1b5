#!/usr/bin/env bash
# The pairwise average before and after issue 14's fused/zero-copy versions, side by side:
# a worktree of the commit before (default 6c787d0) and this checkout take turns, for 4 MB
# and 100 MB models, shared memory (vs a memcpy) and MPI (vs a ping-pong).
#   bash benchmarks/pairwise_before_after.sh [BEFORE_COMMIT] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
before="${1:-6c787d0}"
rounds="${2:-2}"
tmp="$(mktemp -d)"
trap 'git worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
for r in $(seq "$rounds"); do
  for mb in 4 100; do
    for side in before after; do
      dir=.; [ "$side" = before ] && dir="$tmp/before"
      # the old shm-pairwise ignored --size-mb: call its function directly
      shm=$(cd "$dir" && PYTHONPATH=. "$OLDPWD/.venv/bin/python" -c "
from apam_gossip.bench import bench_shm_pairwise
r = bench_shm_pairwise(int($mb * 2**20 / 4), 30)
print(f\"{r['ratio_average_to_memcpy']:.2f}x ({1e3 * r['average_s']:.3f} ms vs {1e3 * r['memcpy_s']:.3f} ms)\")")
      mpi=$(cd "$dir" && PYTHONPATH=. "$OLDPWD/.venv/bin/python" -c "
from apam_gossip.bench import bench_pairwise
r = bench_pairwise($mb, 30)
print(f\"{r['ratio_average_to_pingpong']:.2f}x ({1e3 * r['pairwise_average_s']:.3f} ms vs {1e3 * r['pingpong_s']:.3f} ms)\")")
      echo "round $r  ${mb} MB  $side  shm: $shm  mpi: $mpi"
    done
  done
done
