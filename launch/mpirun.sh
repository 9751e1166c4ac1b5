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
#   /dev/shm); APAM_GOSSIP_SHM_TAG=TAG names it apam-mpi-TAG-XXXXXX.
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
# APAM_GOSSIP_SHM_TAG, if set, goes into the folder's name (as in apam_gossip/mpirun.py:
# sanitized, 64 characters at most), so that on a shared machine whose folder is whose
# can be told
TAG="${APAM_GOSSIP_SHM_TAG:-}"
TAG="${TAG//[^A-Za-z0-9_.-]/_}"
TAG="${TAG:0:64}"
JOB_SHM="$(mktemp -d "$SHM_BASE/apam-mpi-${TAG:+$TAG-}XXXXXX")"
export OMPI_MCA_btl_sm_backing_directory="$JOB_SHM"
# Signals. mpirun forwards SIGUSR1 to every rank, and apam-gossip's ranks take it as an
# orderly stop (the centralized master checkpoints, the workers stop in order, exit 143).
# mpirun's own answer to SIGTERM is SIGTERM then, half a second later, SIGKILL to every
# rank. So a SIGTERM here (Slurm's time limit, scancel) or SIGINT (Ctrl-C) asks for the
# orderly stop first and gives mpirun its SIGTERM only if the job is still running
# $APAM_GOSSIP_STOP_GRACE_S seconds later (default 30), or at a second SIGTERM/SIGINT.
GRACE="${APAM_GOSSIP_STOP_GRACE_S:-30}"
if ! [[ "$GRACE" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "launch/mpirun.sh: error: APAM_GOSSIP_STOP_GRACE_S must be a number of seconds >= 0, got '$GRACE'" >&2
    exit 2
fi
PID="" STOPPING="" WATCH="" ESCALATED=""
cleanup() {
    [ -n "$WATCH" ] && kill "$WATCH" 2>/dev/null
    rm -rf "$JOB_SHM"
}
forward() { [ -n "$PID" ] && kill -"$1" "$PID" 2>/dev/null; }
stop() {  # $1: the signal's exit code (143 SIGTERM, 130 SIGINT)
    [ -n "$PID" ] || return 0
    if [ -z "$STOPPING" ]; then
        STOPPING="$1"
        kill -USR1 "$PID" 2>/dev/null
        # the grace period's clock (its output away from ours: a caller reading our
        # pipes must not wait for it)
        sleep "$GRACE" </dev/null >/dev/null 2>&1 &
        WATCH=$!
    else
        ESCALATED=1
        kill -TERM "$PID" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'stop 143' TERM
trap 'stop 130' INT
trap 'forward USR1' USR1
trap 'forward USR2' USR2
"$MPIRUN" "${ARGS[@]}" "$APAM" "$@" &
PID=$!
# wait returns early when a trapped signal arrives: keep waiting for mpirun to finish,
# and give it its SIGTERM once the grace period after an orderly stop request is over
while true; do
    set +e
    if [ -n "$WATCH" ] && [ -z "$ESCALATED" ]; then
        wait -n "$PID" "$WATCH"
    else
        wait "$PID"
    fi
    set -e
    kill -0 "$PID" 2>/dev/null || break
    if [ -n "$WATCH" ] && [ -z "$ESCALATED" ] && ! kill -0 "$WATCH" 2>/dev/null; then
        ESCALATED=1
        kill -TERM "$PID" 2>/dev/null
    fi
done
set +e
wait "$PID"
RC=$?
set -e
# stopped by SIGTERM (SIGINT): 143 (130), whether the ranks stopped in order or mpirun
# had to kill them
if [ -n "$STOPPING" ] && [ "$RC" != 0 ]; then
    RC="$STOPPING"
fi
exit "$RC"
