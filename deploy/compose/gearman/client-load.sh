#!/bin/sh
# The client load of the demo: a foreground job for "flaky" every LOAD_INTERVAL seconds,
# submitted straight to gearmand (clients need no gproxy), each with a payload of its own so
# each first attempt fails. Prints what the client got; LOAD_COUNT jobs (0: forever), then
# exits 1 if any job failed. Environment: GEARMAND_HOST, GEARMAND_PORT, LOAD_INTERVAL,
# LOAD_COUNT.
set -u
host="${GEARMAND_HOST:-gearmand}"
port="${GEARMAND_PORT:-4730}"
interval="${LOAD_INTERVAL:-1}"
count="${LOAD_COUNT:-0}"
run="$(date +%s)"
n=0
failed=0
while [ "$count" -eq 0 ] || [ "$n" -lt "$count" ]; do
    n=$((n + 1))
    if result=$(gearman -h "$host" -p "$port" -f flaky "job $run-$n"); then
        echo "client: job $run-$n: $result"
    else
        failed=$((failed + 1))
        echo "client: job $run-$n FAILED ($failed so far)" >&2
    fi
    sleep "$interval"
done
[ "$failed" -eq 0 ]
