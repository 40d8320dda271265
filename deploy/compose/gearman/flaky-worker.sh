#!/bin/sh
# A libgearman CLI worker for the function "flaky": the first attempt of every payload fails
# (the command exits 1, so the worker sends WORK_FAIL), the next one succeeds. Behind gproxy,
# with [functions."flaky"] on_fail = true, the client only ever sees the success.
#
# It connects to gproxy at 127.0.0.1:4730, the default a worker is given no server, in the
# network namespace it shares with its gproxy. Environment: GEARMAN_HOST, GEARMAN_PORT,
# FLAKY_STATE_DIR (where the payloads that failed once are remembered), WORKER_NAME.
set -eu
export FLAKY_STATE_DIR="${FLAKY_STATE_DIR:-/var/lib/flaky}"
export WORKER_NAME="${WORKER_NAME:-flaky-worker}"
mkdir -p "$FLAKY_STATE_DIR"
# The job runs in its own sh, which expands these variables (exported above).
# shellcheck disable=SC2016
exec gearman -w -h "${GEARMAN_HOST:-127.0.0.1}" -p "${GEARMAN_PORT:-4730}" -f flaky -- sh -c '
payload=$(cat)
key=$(printf %s "$payload" | sha1sum | cut -c1-40)
if mkdir "$FLAKY_STATE_DIR/$key" 2>/dev/null; then
    echo "$WORKER_NAME: failing the first attempt of: $payload" >&2
    exit 1
fi
echo "$WORKER_NAME: done: $payload"
'
