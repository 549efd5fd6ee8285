#!/bin/bash
# One served measurement of a config: c=32 and c=1 (unique texts), or cache hits.
# usage: bench/try_config.sh NAME 'YAML' [--hits] [extra vecshim serve args...]
# e.g.   bench/try_config.sh w1t2 "models: {minilm: {backend: sentence-transformers, options: {threads: 2}, batch: {workers: 1}}}"
# Loopback only; stops only the server it started. Run under flock /tmp/vecshim-bench.lock.
set -u
name=$1; yaml=$2; shift 2
hits=0; if [ "${1:-}" = "--hits" ]; then hits=1; shift; fi
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/vecshim-try-XXXXXX); cfg=$dir/$name.yaml; printf '%s\n' "$yaml" > "$cfg"
port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
HF_HUB_OFFLINE=1 .venv/bin/vecshim serve --config "$cfg" --bind 127.0.0.1:$port "$@" > "$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do [ "$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:$port/.well-known/ready)" = 204 ] && break; sleep 0.5; done
summary='import json,sys; d=json.load(sys.stdin); print(round(d["texts_per_s"],1), "texts/s p50", round(d["p50_ms"],2), "ms errors", d["errors"])'
if [ $hits = 1 ]; then
  echo "$name hits: $(.venv/bin/python bench/loadgen.py --url http://127.0.0.1:$port --duration 10 --concurrency 32 --corpus repeat --distinct 200 --warmup 400 --json | .venv/bin/python -c "$summary")"
else
  echo "$name c32: $(.venv/bin/python bench/loadgen.py --url http://127.0.0.1:$port --duration 12 --concurrency 32 --seed $RANDOM --json | .venv/bin/python -c "$summary")"
  echo "$name c1:  $(.venv/bin/python bench/loadgen.py --url http://127.0.0.1:$port --duration 8 --concurrency 1 --seed $RANDOM --json | .venv/bin/python -c "$summary")"
  echo "$name batch size sum/count: $(curl -s 127.0.0.1:$port/metrics | grep -E '^vecshim_batch_size_(sum|count)' | awk '{print $2}' | paste -sd' ')"
fi
kill $pid; wait $pid 2>/dev/null
echo "loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$dir"
