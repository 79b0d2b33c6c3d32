#!/usr/bin/env bash
# Counts the instructions the server spends per request, with valgrind's callgrind: repeatable
# for the same binary and inputs whatever else the machine is doing, unlike req/s on a shared VM.
#
#   scripts/callgrind-verify.sh [keyward binary] [verify|healthz|me] [requests]
#
# Starts `keyward serve` under callgrind on a fresh data dir with instrumentation off, creates an
# agent and its key through the API, sends 300 requests to warm every cache, then counts
# `requests` (default 5000) more on one keep-alive connection. Prints the instructions per request
# and leaves the profile in $OUT (default /tmp/keyward-callgrind) for callgrind_annotate.
#
# Given `target/release/keyward-bare` (the load tool's bare-hyper reference) instead, it counts the
# reference's `healthz` or verify-shaped handler the same way, with requests of the same shape
# (an Authorization header the reference does not read, and a key of a Keyward key's length).
# valgrind runs SHA-256 in software (it does not emulate SHA-NI), so subtract `sha2` symbols'
# share when comparing with a real CPU.
set -euo pipefail
BIN=${1:-target/release/keyward}
WHAT=${2:-verify}
N=${3:-5000}
OUT=${OUT:-/tmp/keyward-callgrind}
PORT=${PORT:-7799}
rm -rf "$OUT" && mkdir -p "$OUT/data"
BARE=0
case "$(basename "$BIN")" in keyward-bare*) BARE=1 ;; esac
if [ "$BARE" = 1 ]; then
  if [ "$WHAT" = me ]; then
    echo "keyward-bare has no /v1/me" >&2
    exit 2
  fi
  # Tokens of a Keyward key's length: the reference hashes whatever it is given.
  python3 -c 'import secrets, string
a = string.ascii_letters + string.digits
for _ in range(1000): print("kw_ak_" + "".join(secrets.choice(a) for _ in range(36)))' >"$OUT/tokens"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" "$OUT/tokens" >"$OUT/serve.log" 2>&1 &
else
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" --data-dir "$OUT/data" serve --listen "127.0.0.1:$PORT" >"$OUT/serve.log" 2>&1 &
fi
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if [ "$BARE" = 1 ]; then
    PORT=$(grep -o 'bare listening on 127.0.0.1:[0-9]*' "$OUT/serve.log" 2>/dev/null | cut -d: -f2 || true)
    [ -n "$PORT" ] && break
  else
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  fi
  sleep 0.2
done
if [ -z "$PORT" ] || ! curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then
  echo "the server did not start:" >&2
  cat "$OUT/serve.log" >&2
  exit 1
fi
python3 - "$PORT" "$OUT" "$WHAT" "$N" "$PID" "$BARE" <<'PY'
import http.client, json, subprocess, sys
port, out, what, n, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
bare = sys.argv[6] == "1"
if bare:
    tokens = open(f"{out}/tokens").read().split()
    # The reference reads no Authorization header; one of the same length keeps the request's
    # bytes, and so hyper's parsing of it, the same as Keyward's.
    root, agent_key = tokens[0], tokens[1]
else:
    root = open(f"{out}/data/root-key").read().strip()
c = http.client.HTTPConnection("127.0.0.1", int(port))
def call(method, path, body=None, key=root):
    headers = {"authorization": f"Bearer {key}"}
    if body is not None:
        body = json.dumps(body)
        headers["content-type"] = "application/json"
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    return r.status, data
import re
if not bare:
    org = re.search(r"Created org `default` \(([0-9a-f-]+)\)", open(f"{out}/serve.log").read()).group(1)
    status, made = call("POST", f"/v1/orgs/{org}/agents", {
        "name": "callgrind", "scopes": {"slack": ["chat:write"]},
        "key": {"scopes": ["slack:chat:write"]}})
    assert status == 201, made
    agent_key = json.loads(made)["api_key"]
# The measured requests go over a raw socket, each written in one piece as a load generator
# writes it (http.client writes a body apart from its head, which makes the server poll the
# connection twice per request).
import socket
sock = socket.create_connection(("127.0.0.1", int(port)))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if what == "verify":
    body = json.dumps({"key": agent_key}).encode()
    wire = (f"POST /v1/keys/verify HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {root}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
elif what == "me":
    wire = f"GET /v1/me HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {agent_key}\r\n\r\n".encode()
else:
    wire = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
buf = b""
def one():
    global buf
    sock.sendall(wire)
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(buf) < length:
        buf += sock.recv(65536)
    buf = buf[length:]
for _ in range(300):
    one()
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
for _ in range(n):
    one()
subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
PY
sleep 1
F=$(ls -S "$OUT"/callgrind.out* | head -1)
TOTAL=$(callgrind_annotate "$F" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
SHA=$(callgrind_annotate --inclusive=no "$F" 2>/dev/null | awk '/sha2/ {gsub(",","",$1); s+=$1} END {print s+0}')
echo "$WHAT: $((TOTAL / N)) instructions per request, $(((TOTAL - SHA) / N)) besides SHA-256 ($F)"
