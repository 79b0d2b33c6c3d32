#!/usr/bin/env bash
# Where an endpoint's server CPU time goes, next to the static handler's, per request: samples
# the server with `perf` while `keyward-load --only` drives one endpoint at a time, then prints
# microseconds of server CPU per request by group (Keyward's code, hyper, the allocator, the
# SQLite writer thread, the kernel, ...) and the symbols that differ most.
#
#   scripts/perf-endpoints.sh [endpoint, default verify] [connections, default 64]
#
# Needs `cargo build --release -p keyward -p keyward-load` first, and `perf` (on a VM without
# hardware counters it samples on the CPU clock, which is what is wanted here: time, not
# instructions; `scripts/callgrind-verify.sh` counts instructions). Each endpoint is driven for
# 25 s and sampled for 15 s of it, after 3 s of warm-up. Samples are CPU time, so the figures are
# per request whatever the throughput was; the machine's noise still moves them by several
# percent between runs.
set -euo pipefail
WHAT=${1:-verify}
CONNS=${2:-64}
OUT=${OUT:-/tmp/keyward-perf}
HZ=1999
SECONDS_SAMPLED=15
mkdir -p "$OUT"
for endpoint in static "$WHAT"; do
  log="$OUT/$endpoint.log"
  ./target/release/keyward-load --keys 10000 --connections "$CONNS" --seconds 25 \
    --only "$endpoint" >"$log" 2>&1 &
  load=$!
  for _ in $(seq 1 600); do
    grep -q "server pid" "$log" 2>/dev/null && break
    sleep 0.1
  done
  pid=$(grep -o "server pid [0-9]*" "$log" | awk '{print $3}')
  if [ -z "$pid" ]; then
    echo "keyward-load did not start driving $endpoint:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 3
  perf record -F "$HZ" -p "$pid" -o "$OUT/$endpoint.data" -- sleep "$SECONDS_SAMPLED" >/dev/null 2>&1
  wait "$load"
  tail -1 "$log"
  perf report -i "$OUT/$endpoint.data" --no-children --sort comm,dso,symbol \
    -F sample,comm,dso,sym --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' >"$OUT/$endpoint.syms"
done
python3 - "$OUT" "$WHAT" "$HZ" "$SECONDS_SAMPLED" <<'PY'
import re, sys
out, what, hz, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def rps(endpoint):
    line = open(f"{out}/{endpoint}.log").read().strip().splitlines()[-1]
    return float(re.search(r": (\d+) req/s", line).group(1))

def per_request(endpoint):
    """Microseconds of server CPU per request, by (thread, symbol)."""
    scale = 1e6 / hz / (rps(endpoint) * secs)
    d = {}
    for line in open(f"{out}/{endpoint}.syms"):
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit():
            # perf pads its columns to each report's widest entry: the symbol's text is
            # compared with its runs of spaces collapsed, or the two reports' keys differ.
            key = (parts[1], " ".join(parts[2].split()))
            d[key] = d.get(key, 0) + int(parts[0]) * scale
    return d

s, v = per_request("static"), per_request(what)
# First match wins: the SQLite writer's thread is its own group, whatever it runs.
groups = [
    ("SQLite writer thread (usage flush)", lambda t, k: t.startswith("sqlx-sqlite")),
    ("kernel: scheduler, wake-ups", lambda t, k: "[k]" in k and re.search(r"switch|wake|irqrestore|schedule|futex|idle", k)),
    ("kernel: the rest (TCP, syscalls, faults)", lambda t, k: "[k]" in k),
    ("Keyward's code", lambda t, k: re.search(r"keyward_", k)),
    ("hyper, http, httparse", lambda t, k: re.search(r"hyper|http::|httparse", k)),
    ("allocator", lambda t, k: re.search(r"\bmi_|_mi_|malloc|free", k)),
    ("memcpy, memmove, memcmp", lambda t, k: re.search(r"memmove|memcpy|memcmp", k)),
    ("SHA-256", lambda t, k: "sha2" in k),
    ("tokio", lambda t, k: "tokio" in k),
    ("futures, axum, tower (generic glue)", lambda t, k: re.search(r"futures|axum|tower|core::pin|core::future|core::ops::function", k)),
    ("other", lambda t, k: True),
]

def grouped(d):
    g = {name: 0.0 for name, _ in groups}
    for (t, k), x in d.items():
        for name, match in groups:
            if match(t, k):
                g[name] += x
                break
    return g

gs, gv = grouped(s), grouped(v)
print(f"\nserver CPU per request, microseconds (static {rps('static'):.0f} req/s, {what} {rps(what):.0f} req/s)\n")
print(f"| group | static | {what} | difference |\n|---|---|---|---|")
for name, _ in groups:
    print(f"| {name} | {gs[name]:.2f} | {gv[name]:.2f} | {gv[name] - gs[name]:+.2f} |")
ts, tv = sum(gs.values()), sum(gv.values())
print(f"| total | {ts:.2f} | {tv:.2f} | {tv - ts:+.2f} |")
print(f"\nsymbols that differ most (microseconds per request: static, {what}, difference)")
keys = sorted(set(s) | set(v), key=lambda k: -(v.get(k, 0) - s.get(k, 0)))
for k in keys[:25]:
    print(f"{s.get(k, 0):6.3f} {v.get(k, 0):6.3f} {v.get(k, 0) - s.get(k, 0):+6.3f}  {k[0]}: {k[1][:100]}")
PY
