#!/usr/bin/env bash
# Render a study's report.html the way a reader sees it, offline: Debian's headless Chromium writes a screenshot,
# with the network cut off (a dead proxy, every host unresolvable) and a net log proving no request left the machine.
#   scripts/check_report.sh RUN_DIR [SCREENSHOT.png]      (default: RUN_DIR/report.png)
# Exit 0: rendered, nothing fetched; 1: the report refers to the network or a request went out; 2: bad input.
set -euo pipefail
run=${1:?usage: scripts/check_report.sh RUN_DIR [SCREENSHOT.png]}
html="$run/report.html"
png=${2:-$run/report.png}
[ -f "$html" ] || { echo "error: $html: not found (run vlsafe report $run)" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "error: chromium not installed (apt-get install chromium)" >&2; exit 2; }
if grep -Eqi '<script|<link|(src|href)=["'"'"']?(https?:)?//' "$html"; then
  echo "error: $html has scripts, stylesheets or links that would reach the network" >&2; exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# a tall window: the screenshot holds the whole page (tables and every plot)
timeout 180 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --proxy-server=127.0.0.1:9 --host-resolver-rules="MAP * ~NOTFOUND" --log-net-log="$profile/net.json" \
  --hide-scrollbars --window-size=1400,${CHECK_REPORT_HEIGHT:-5000} --screenshot="$(realpath -m "$png")" \
  "file://$(realpath "$html")" >"$profile/stdout" 2>&1 || { tail -5 "$profile/stdout" >&2; exit 1; }
[ -s "$png" ] || { echo "error: no screenshot written" >&2; exit 1; }
# Chromium itself asks for a few google.com URLs at start-up (sign-in, new-tab page); the dead proxy and the
# resolver rules stop them. What matters is what reached the wire: no TCP connection and no byte sent to an
# address off this machine (the UDP "connect" of Chromium's IPv6 reachability probe sends nothing).
python3 - "$profile/net.json" <<'PY' || exit 1
import json, sys
log = json.load(open(sys.argv[1]))
names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
local = ("127.", "[::1]", "localhost")
sent = {"TCP_CONNECT", "TCP_CONNECT_ATTEMPT", "UDP_BYTES_SENT", "SOCKET_BYTES_SENT"}
left = [(names[e["type"]], (e.get("params") or {}).get("address")) for e in log["events"]
        if names.get(e["type"]) in sent and (e.get("params") or {}).get("address")
        and not str((e.get("params") or {}).get("address")).startswith(local)]
if left:
    print("error: traffic left the machine: %s" % left[:5], file=sys.stderr)
    sys.exit(1)
PY
echo "ok: $png (no network request)"
