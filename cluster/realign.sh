#!/bin/bash
# Scheduled re-alignment: one fresh run of the whole chain on SLURM, named after the time, so
# that prepare reads the data as it is now (data.path is refreshed by whatever feeds it), the
# chain trains and evaluates against the current champion, and the promote gate decides.
#
#   cluster/realign.sh CONFIG [key=value ...]
#
# Waits for the chain to end (exit 0: every stage completed, whether or not the gate promoted;
# non-zero: a stage failed, its job and log are named on stderr). Called by cron or scrontab
# (cluster/cron.example); `flock` there keeps two re-alignments from overlapping.
set -euo pipefail
if (( $# < 1 )); then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi
config=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
base=$(basename "$config" .yaml)
name="realign-${base}-$(date +%Y%m%d-%H%M)"
echo "[realign] $(date -Is): run ${name} from ${config}" >&2
make submit WAIT=1 CONFIG="$config" ARGS="name=${name} $*"
