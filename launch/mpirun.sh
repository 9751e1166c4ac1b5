#!/usr/bin/env bash
# Run apam-gossip under OpenMPI's mpirun with settings that work out of the box.
#
#   launch/mpirun.sh -n 4 [--hostfile FILE] train --mode decentralized --topology topologies/ring4.edgelist
#
# * -n N: number of ranks (centralized: rank 0 is the master, N-1 workers; decentralized:
#   N workers, so the topology needs N nodes).
# * --hostfile FILE: hosts and slots (see launch/hostfile.example); without it all ranks run
#   here, oversubscribed if N exceeds the cores (--map-by :OVERSUBSCRIBE; OpenMPI 5 ignores
#   the old rmaps_base_oversubscribe setting) over shared memory (pml ob1, btl self,sm).
#   With a hostfile the TCP transport is added so ranks on different hosts can talk.
# * as root, OpenMPI refuses to start unless OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1: set here.
# * OpenMPI's shared-memory segments (16 MB per rank) go to a folder of this job's own,
#   removed when the job ends however it ends (an aborted or killed job leaves nothing in
#   /dev/shm).
# Everything after the options is passed to apam-gossip.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MPIRUN="${MPIRUN:-$ROOT/.venv/bin/mpirun}"
APAM="${APAM:-$ROOT/.venv/bin/apam-gossip}"
[ -x "$MPIRUN" ] || MPIRUN="$(command -v mpirun || true)"
[ -x "$APAM" ] || APAM="$(command -v apam-gossip || true)"
if [ -z "$MPIRUN" ] || [ -z "$APAM" ]; then
    echo "launch/mpirun.sh: error: mpirun or apam-gossip not found; run 'bash launch/setup.sh' first" >&2
    exit 2
fi
N="" HOSTFILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n|-np) N="${2:-}"; shift 2 ;;
        --hostfile) HOSTFILE="${2:-}"; shift 2 ;;
        *) break ;;
    esac
done
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/mpirun.sh: error: give the number of ranks as -n N (N >= 1), got '${N}'" >&2
    exit 2
fi
if [ -n "$HOSTFILE" ] && [ ! -r "$HOSTFILE" ]; then
    echo "launch/mpirun.sh: error: hostfile '$HOSTFILE' is not readable; see launch/hostfile.example" >&2
    exit 2
fi
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
ARGS=(-n "$N" --map-by :OVERSUBSCRIBE)
if [ -n "$HOSTFILE" ]; then
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm,tcp}"
    ARGS+=(--hostfile "$HOSTFILE")
else
    export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}"
fi
SHM_BASE=/dev/shm
[ -d "$SHM_BASE" ] && [ -w "$SHM_BASE" ] || SHM_BASE="${TMPDIR:-/tmp}"
JOB_SHM="$(mktemp -d "$SHM_BASE/apam-mpi-XXXXXX")"
export OMPI_MCA_btl_sm_backing_directory="$JOB_SHM"
PID=""
cleanup() { rm -rf "$JOB_SHM"; }
forward() { [ -n "$PID" ] && kill -"$1" "$PID" 2>/dev/null; }
trap cleanup EXIT
trap 'forward TERM' TERM
trap 'forward INT' INT
"$MPIRUN" "${ARGS[@]}" "$APAM" "$@" &
PID=$!
# wait returns early when a trapped signal arrives: keep waiting for mpirun to finish
while true; do
    set +e
    wait "$PID"
    RC=$?
    set -e
    kill -0 "$PID" 2>/dev/null || break
done
exit "$RC"
