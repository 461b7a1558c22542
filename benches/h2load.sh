#!/usr/bin/env bash
# Unary gRPC pass-through under h2load, in one run: GetProfile straight to the
# profiles service, through the gateway (its own process: JWT + RBAC +
# routing) with a role that is allowed and with one that is denied, and
# through nginx `grpc_pass` (upstream keepalive) in front of the same
# service; once as a real lookup and once answered before any database work.
# Also: a policy reload during a gateway run, and peak RSS per process.
#
#   bash benches/h2load.sh            # needs nginx and h2load (Debian: nginx, nghttp2-client)
#
# h2load counts a gRPC error as HTTP 200, so every path is first called once
# and its grpc-status checked. Rounds alternate between paths; medians are
# reported. Latency percentiles come from h2load's per-request log.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-16}
STREAMS=${STREAMS:-8}

cd "$(dirname "$0")/.."
for tool in nginx h2load python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install nginx nghttp2-client)" >&2; exit 1; }
done
cargo build --release -q --bin madtech
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
madtech="$target_dir/release/madtech"

work=$(mktemp -d /dev/shm/madtech-h2load.XXXXXX 2>/dev/null || mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # nginx's errors outlive the run: a stall is explained there.
  if [ -s "$work/nginx-error.log" ]; then
    cp "$work/nginx-error.log" "${TMPDIR:-/tmp}/madtech-h2load-nginx-error.log"
    echo "nginx logged errors: ${TMPDIR:-/tmp}/madtech-h2load-nginx-error.log" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The policies are copied so the reload test can change them.
cp -r policies "$work/policies"
"$madtech" up --data-dir "$work/data" --policy-dir "$work/policies" >"$work/suite.log" 2>&1 &
suite_pid=$!
pids+=("$suite_pid")
for _ in $(seq 1 200); do
  (echo >/dev/tcp/127.0.0.1/50051) 2>/dev/null && (echo >/dev/tcp/127.0.0.1/50052) 2>/dev/null && break
  sleep 0.1
done
sleep 1

# The gateway measured runs as its own process (as nginx does), in front of
# the suite's services, so its memory can be read alone.
MADTECH_GATEWAY__POLICY_DIR="$work/policies" \
MADTECH_GATEWAY__AUTH__PUBLIC_KEY_FILE="$work/data/jwt-public-key.pem" \
MADTECH_GATEWAY__PSEUDONYM_KEY_FILE="$work/data/pseudonym.key" \
MADTECH_GATEWAY__AUDIT_DATABASE__URL="sqlite://$work/gateway-audit.db?mode=rwc" \
  "$madtech" serve gateway --listen 127.0.0.1:50061 --metrics-addr 127.0.0.1:9091 >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
for _ in $(seq 1 100); do
  (echo >/dev/tcp/127.0.0.1/50061) 2>/dev/null && break
  sleep 0.1
done
if ! kill -0 "$gateway_pid" 2>/dev/null; then
  echo "the gateway did not start:" >&2
  cat "$work/gateway.log" >&2
  exit 1
fi

cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  # nginx closes a connection (HTTP/2: GOAWAY) after 1,000 requests by
  # default, towards callers and upstreams alike; h2load does not reconnect,
  # so the default ends each of its connections early and looks like a stall.
  keepalive_requests 1000000;
  upstream profiles { server 127.0.0.1:50052; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:50090 http2;
    location / { grpc_pass grpc://profiles; }
  }
}
EOF
nginx -c "$work/nginx.conf" -g 'daemon off;' &
nginx_pid=$!
pids+=("$nginx_pid")
sleep 0.5

admin=$("$madtech" token --data-dir "$work/data" --role admin)
denied=$("$madtech" token --data-dir "$work/data" --role activation)

# gRPC message bodies: 1 flag byte, 4-byte big-endian length, protobuf.
python3 - "$work" <<'EOF'
import struct, sys
work = sys.argv[1]
def string(field, text):
    data = text.encode()
    return bytes([field << 3 | 2, len(data)]) + data
def message(field, body):
    return bytes([field << 3 | 2, len(body)]) + body
identifier = string(1, "email") + string(2, "bench@example.com")
upsert = message(1, identifier) + string(3, "FR")
get = message(2, identifier)
# An empty GetProfileRequest: the service answers INVALID_ARGUMENT before any
# database work, so only the hops are measured.
for name, body in [("upsert", upsert), ("get", get), ("empty", b"")]:
    with open(f"{work}/{name}.bin", "wb") as f:
        f.write(b"\x00" + struct.pack(">I", len(body)) + body)
EOF

grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')
path_url() {
  case $1 in
    direct) echo "http://127.0.0.1:50052/madtech.profiles.v1.ProfileService/$2" ;;
    nginx) echo "http://127.0.0.1:50090/madtech.profiles.v1.ProfileService/$2" ;;
    gateway|denied) echo "http://127.0.0.1:50061/madtech.profiles.v1.ProfileService/$2" ;;
  esac
}
auth_for() {
  case $1 in
    gateway) echo "authorization: Bearer $admin" ;;
    denied) echo "authorization: Bearer $denied" ;;
    *) echo "x-bench: 1" ;;
  esac
}

# The profile to read, created once through the gateway.
h2load -n 1 -c 1 "${grpc_headers[@]}" -H "$(auth_for gateway)" -d "$work/upsert.bin" \
  "$(path_url gateway UpsertProfile)" >/dev/null

# One call per path with its grpc-status. h2load prints response headers but
# not trailers: an error answers trailers-only (grpc-status in the headers),
# while a success sends its message and then grpc-status 0 in the trailers.
check() {
  local path=$1 body=$2 want=$3 out got
  out=$(h2load -n 1 -c 1 -v "${grpc_headers[@]}" -H "$(auth_for "$path")" -d "$work/$body.bin" \
    "$(path_url "$path" GetProfile)" 2>&1)
  got=$(echo "$out" | sed -n 's/.*grpc-status: \([0-9]*\).*/\1/p' | head -1)
  if [ -z "$got" ] && echo "$out" | grep -q '^traffic: .* [1-9][0-9]*B ([0-9]*) data'; then
    got=0
  fi
  if [ "$got" != "$want" ]; then
    echo "$path $body: grpc-status ${got:-none}, expected $want" >&2
    exit 1
  fi
}
for path in direct nginx gateway; do
  check "$path" get 0
  check "$path" empty 3
done
check denied get 7

# Runs h2load against a path; prints "requests/s p50_us p99_us failed".
load() {
  local path=$1; shift
  local log="$work/$path.log"
  rm -f "$log"
  local out
  out=$(h2load -t 1 -c "$CLIENTS" -m "$STREAMS" -D "$DURATION" --warm-up-time=1 "$@" \
    "${grpc_headers[@]}" -H "$(auth_for "$path")" -d "$work/$BODY.bin" --log-file="$log" \
    "$(path_url "$path" GetProfile)")
  # No request finished at all: the path stalled (seen with nginx before
  # keepalive_requests was raised: its GOAWAY after 1,000 calls).
  if [ ! -s "$log" ]; then
    echo "0 0 0 stalled"
    return
  fi
  local rps failed
  rps=$(echo "$out" | sed -n 's/^finished in .* \([0-9.]*\) req\/s.*/\1/p')
  failed=$(echo "$out" | sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p')
  python3 - "$log" "$rps" "${failed:-0}" <<'EOF'
import sys
times = sorted(int(line.split("\t")[2]) for line in open(sys.argv[1]) if line.strip())
pick = lambda p: times[min(len(times) - 1, int(p * len(times)))]
print(sys.argv[2], pick(0.50), pick(0.99), sys.argv[3])
EOF
}

# The process that proxies a path (nginx: its one worker), none for direct.
proxy_pid() {
  case $1 in
    gateway|denied) echo "$gateway_pid" ;;
    nginx) pgrep -P "$nginx_pid" | head -1 ;;
  esac
}
# User + system CPU of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU µs per call between two tick readings (the warm-up second included in
# the calls, as in the CPU time).
cpu_us_per_call() {
  python3 -c "import os; print(int(($2 - $1) * 1e6 / os.sysconf('SC_CLK_TCK') / max(1.0, $3)))"
}
# load() with the CPU per call that the services and the path's proxy (0
# without one) spent meanwhile: "req/s p50_us p99_us failed services proxy".
load_with_cpu() {
  local path=$1; shift
  local proxy s0 p0=0 p1=0 row calls
  proxy=$(proxy_pid "$path")
  s0=$(cpu_ticks "$suite_pid")
  if [ -n "$proxy" ]; then p0=$(cpu_ticks "$proxy"); fi
  row=$(load "$path" "$@")
  if [ -n "$proxy" ]; then p1=$(cpu_ticks "$proxy"); fi
  calls=$(echo "$row" | awk -v d="$DURATION" '{print $1 * (d + 1)}')
  echo "$row $(cpu_us_per_call "$s0" "$(cpu_ticks "$suite_pid")" "$calls") $(cpu_us_per_call "$p0" "$p1" "$calls")"
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# The median of column N over the rounds' rows of load() output.
column_median() { echo -n "$1" | awk -v n="$2" '{print $n}' | median; }

measure() {
  paths=(direct gateway denied nginx)
  declare -A full
  echo
  echo "# $TITLE ($ROUNDS rounds, ${DURATION}s each, $CLIENTS connections x $STREAMS streams)"
  # With the CPU each process spends per call at full load: what a proxy's
  # hop costs, next to what the service spends answering.
  for round in $(seq 1 "$ROUNDS"); do
    for path in "${paths[@]}"; do
      full[$path]+="$(load_with_cpu "$path")"$'\n'
    done
  done
  echo
  echo "## Full load"
  echo "| path | req/s | p50 µs | p99 µs | failed | CPU µs/call, services | CPU µs/call, proxy |"
  echo "|---|---|---|---|---|---|---|"
  declare -A best
  for path in "${paths[@]}"; do
    rps=$(column_median "${full[$path]}" 1)
    p50=$(column_median "${full[$path]}" 2)
    p99=$(column_median "${full[$path]}" 3)
    failed=$(echo -n "${full[$path]}" | awk '$4 == "stalled" {st=1} {s+=$4} END {print (st ? "stalled" : s)}')
    best[$path]=$rps
    proxy_cpu="—"
    [ "$path" != direct ] && proxy_cpu=$(column_median "${full[$path]}" 6)
    echo "| $path | $rps | $p50 | $p99 | $failed | $(column_median "${full[$path]}" 5) | $proxy_cpu |"
  done
  ratio() { python3 -c "print(f'{float($1)/float($2):.2f}' if float($2) else 'n/a')"; }
  echo
  echo "gateway / direct: $(ratio "${best[gateway]}" "${best[direct]}")"
  echo "gateway / nginx: $(ratio "${best[gateway]}" "${best[nginx]}")"
  echo "nginx / direct: $(ratio "${best[nginx]}" "${best[direct]}")"
  echo "denied / allowed (gateway): $(ratio "${best[denied]}" "${best[gateway]}")"

  # One call at a time: what a hop adds with nothing queued anywhere. (nginx
  # is left out: with one stream, a request it leaves hanging stops the run;
  # the same stalls are the "failed" requests under load.)
  # The CPU each process spends per call shows where the added time goes.
  declare -A single
  for round in $(seq 1 "$ROUNDS"); do
    for path in direct gateway; do
      single[$path]+="$(CLIENTS=1 STREAMS=1 load_with_cpu "$path")"$'\n'
    done
  done
  echo
  echo "## One call at a time (1 connection, 1 stream)"
  echo "| path | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU µs/call, services | CPU µs/call, gateway |"
  echo "|---|---|---|---|---|---|---|---|"
  s50=$(column_median "${single[direct]}" 2)
  s99=$(column_median "${single[direct]}" 3)
  for path in direct gateway; do
    rps=$(column_median "${single[$path]}" 1)
    p50=$(column_median "${single[$path]}" 2)
    p99=$(column_median "${single[$path]}" 3)
    echo "| $path | $rps | $p50 | $p99 | $(python3 -c "print(int($p50 - $s50))") | $(python3 -c "print(int($p99 - $s99))") | $(column_median "${single[$path]}" 5) | $(column_median "${single[$path]}" 6) |"
  done

  # Half of each proxy's own maximum, offered to it and, in the same round,
  # to the direct path: the latency the hop adds while the proxy has room.
  # (Half of direct's maximum overloads any proxy that keeps less than half
  # of direct's throughput, and then measures its queue, not its hop.)
  # Paced calls go one at a time on each connection: with several streams
  # per connection, h2load's pacing sends a connection's calls in bursts,
  # and the latencies measured the burst's queue (direct alone: 1.4 ms mean
  # at a fifth of its maximum with 8 streams, 0.19 ms with 1).
  declare -A halfload offered
  for proxy in gateway nginx; do
    offered[$proxy]=$(python3 -c "print(max(1, int(float(${best[$proxy]}) / 2 / $CLIENTS)))")
  done
  for round in $(seq 1 "$ROUNDS"); do
    for proxy in gateway nginx; do
      halfload[direct-$proxy]+="$(STREAMS=1 load direct --rps="${offered[$proxy]}")"$'\n'
      halfload[$proxy]+="$(STREAMS=1 load "$proxy" --rps="${offered[$proxy]}")"$'\n'
    done
  done
  echo
  echo "## Half of each proxy's maximum (the same rate offered to direct in the same round)"
  echo "| proxy | req/s offered | req/s done, direct · proxy | direct p50 µs | direct p99 µs | proxy p50 µs | proxy p99 µs | added p50 µs | added p99 µs |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for proxy in gateway nginx; do
    d50=$(column_median "${halfload[direct-$proxy]}" 2)
    d99=$(column_median "${halfload[direct-$proxy]}" 3)
    p50=$(column_median "${halfload[$proxy]}" 2)
    p99=$(column_median "${halfload[$proxy]}" 3)
    echo "| $proxy | $((offered[$proxy] * CLIENTS)) | $(column_median "${halfload[direct-$proxy]}" 1) · $(column_median "${halfload[$proxy]}" 1) | $d50 | $d99 | $p50 | $p99 | $(python3 -c "print(int($p50 - $d50))") | $(python3 -c "print(int($p99 - $d99))") |"
  done
}

BODY=get TITLE="GetProfile by email (a real lookup in the profiles service)" measure
BODY=empty TITLE="GetProfile with no lookup (INVALID_ARGUMENT from the service, no database work: the hops alone)" measure

# A policy reload in the middle of a gateway run: a comment changes the set's
# version, the gateway swaps it in; no call may fail.
(
  sleep $((DURATION / 2))
  echo "# reloaded during the benchmark" >>"$work/policies/rbac_policy.csv"
) &
reload=$(BODY=get load gateway)
echo
echo "## Policy reload during a gateway run"
echo "req/s p50 p99 failed: $reload"
grep -q "new policy set in force" "$work/gateway.log" && echo "the new set was put in force during the run"

suite_peak=$(awk '/VmHWM/ {print $2}' "/proc/$suite_pid/status")
gateway_peak=$(awk '/VmHWM/ {print $2}' "/proc/$gateway_pid/status")
nginx_peak=$(awk '/VmHWM/ {s+=$2} END {print s}' $(pgrep -f "nginx: " | sed 's#.*#/proc/&/status#'))
echo
echo "## Peak RSS"
echo "- gateway process: $((gateway_peak / 1024)) MiB"
echo "- nginx (master and worker): $((nginx_peak / 1024)) MiB"
echo "- the services' process (madtech up, its own idle gateway included): $((suite_peak / 1024)) MiB"
