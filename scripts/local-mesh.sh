#!/usr/bin/env bash
# Start N agentmesh nodes on 127.0.0.1, each bootstrapped to the one before,
# print their API addresses and tokens, and stop them all on Ctrl-C.
#
#   scripts/local-mesh.sh 3            # three nodes
#   MESH_DIR=/tmp/m API_BASE=7800 P2P_BASE=7900 scripts/local-mesh.sh 5
#
# Data dirs live under $MESH_DIR (default: a fresh temp dir); logs in each
# node's dir as node.log. Set AGENTMESH_BIN to use a prebuilt binary.
set -euo pipefail

n="${1:-3}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
  echo "usage: $0 N   (N >= 1 nodes)" >&2
  exit 2
fi
api_base="${API_BASE:-7800}"
p2p_base="${P2P_BASE:-7900}"
mesh="${MESH:-local}"
root="${MESH_DIR:-$(mktemp -d -t agentmesh-local.XXXXXX)}"
here="$(cd "$(dirname "$0")/.." && pwd)"

if [ -z "${AGENTMESH_BIN:-}" ]; then
  (cd "$here" && cargo build --release --quiet)
  AGENTMESH_BIN="$here/target/release/agentmesh"
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping ${#pids[@]} nodes..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "data dirs kept in $root"
}
trap cleanup INT TERM EXIT

prev=""
for i in $(seq 0 $((n - 1))); do
  dir="$root/node$i"
  mkdir -p "$dir"
  id="$("$AGENTMESH_BIN" init --data-dir "$dir" --mesh "$mesh" --force | awk '/^node id:/ {print $3}')"
  api="127.0.0.1:$((api_base + i))"
  p2p="/ip4/127.0.0.1/tcp/$((p2p_base + i))"
  args=(node --data-dir "$dir" --listen "$p2p" --api "$api" --mesh "$mesh" --no-mdns)
  if [ -n "$prev" ]; then args+=(--bootstrap "$prev"); fi
  "$AGENTMESH_BIN" "${args[@]}" >"$dir/node.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    if curl -fsS "http://$api/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "node$i failed to start; its log:" >&2
      cat "$dir/node.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  printf 'node%-3s id %s\n        api http://%s  token %s\n        p2p %s\n' \
    "$i" "$id" "$api" "$(cat "$dir/api-token")" "$p2p/p2p/$id"
  prev="$p2p/p2p/$id"
done

echo
echo "try:  curl -s -H \"Authorization: Bearer \$(cat $root/node0/api-token)\" http://127.0.0.1:$api_base/v1/peers"
echo "Ctrl-C stops all nodes."
wait
