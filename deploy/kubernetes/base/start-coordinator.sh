#!/bin/sh
# Starts the coordinator for run $RUN_NAME, or resumes it from its newest checkpoint when the run
# directory already has one (a pre-empted or restarted pod). A finished run is left alone.
set -eu
run="/runs/${RUN_NAME:?set RUN_NAME}"
common="--listen 0.0.0.0:7070 --metrics-addr 0.0.0.0:9100 --local-workers 0 --tls-dir /etc/metatrain/tls"
if [ -f "$run/report.json" ] && grep -q '"interrupted": false' "$run/report.json"; then
  echo "run $run has finished; see $run/report.json"
  exit 0
elif [ -d "$run/checkpoints" ]; then
  # shellcheck disable=SC2086 # $common is a list of options
  exec metatrain train --resume "$run" $common
else
  # shellcheck disable=SC2086
  exec metatrain train --config /etc/metatrain/run.toml --out "$run" $common
fi
