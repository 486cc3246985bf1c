#!/bin/sh
# The compose stack's worker: on its first start it makes its own worker token with the
# scheduler's operator token (the scheduler's data volume, mounted read-only) and keeps it in its
# own volume; then it runs. A real GPU box gets its token and broker user from `kiln worker add`.
set -eu
token_file=/var/lib/kiln-worker/worker.token
if [ ! -s "$token_file" ]; then
  until [ -s /var/lib/kiln/operator.token ] && curl -fsS "$KILN_SCHEDULER_URL/healthz" >/dev/null; do
    echo "waiting for the scheduler at $KILN_SCHEDULER_URL"; sleep 2
  done
  KILN_TOKEN=$(cat /var/lib/kiln/operator.token) KILN_SERVER="$KILN_SCHEDULER_URL" \
    kiln token create --role worker --name "$KILN_WORKER_ID" >"$token_file.new"
  mv "$token_file.new" "$token_file"
fi
KILN_WORKER_TOKEN=$(cat "$token_file")
export KILN_WORKER_TOKEN
exec kiln-worker run
