#!/bin/sh
# Starts the coordinator for run $RUN_NAME, or resumes it from its newest checkpoint when the run
# directory already has one (a pre-empted or restarted pod). A finished run is left alone.
#
# On SIGTERM (pod eviction, pre-emption) the coordinator hands back the step in flight, checkpoints and
# exits 0 with `"interrupted": true` in report.json. This script then exits 75 (EX_TEMPFAIL), not 0, so
# that the Job controller counts the pod as failed and starts a new one, which resumes the run; a 0
# would mark the Job complete and the run would never finish. The script is PID 1 in the container, so
# it forwards SIGTERM/SIGINT to the coordinator itself.
set -eu
run="/runs/${RUN_NAME:?set RUN_NAME}"
common="--listen 0.0.0.0:7070 --metrics-addr 0.0.0.0:9100 --local-workers 0 --tls-dir /etc/metatrain/tls"
if [ -f "$run/report.json" ] && grep -q '"interrupted": false' "$run/report.json"; then
  echo "run $run has finished; see $run/report.json"
  exit 0
elif [ -d "$run/checkpoints" ]; then
  # shellcheck disable=SC2086 # $common is a list of options
  metatrain train --resume "$run" $common &
else
  # shellcheck disable=SC2086
  metatrain train --config /etc/metatrain/run.toml --out "$run" $common &
fi
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
wait "$child" || status=$?
# A trapped signal ends `wait` early; wait again until the coordinator has checkpointed and exited.
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
if [ "$status" -eq 0 ] && grep -q '"interrupted": true' "$run/report.json" 2>/dev/null; then
  echo "run $run was interrupted and checkpointed; exiting 75 so that a new pod resumes it" >&2
  exit 75
fi
exit "$status"
