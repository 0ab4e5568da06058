#!/usr/bin/env bash
# Screenshots of two manual pages in headless Chromium (Debian package `chromium`), into
# docs/screenshots/ (excluded from the site). Run after `make docs` has built site/.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-8765}
python3 -m http.server "$port" --bind 127.0.0.1 --directory site >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
mkdir -p docs/screenshots
for page in "getting-started/:getting-started" "results/:results"; do
    url=${page%%:*}
    name=${page##*:}
    profile=$(mktemp -d)
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" --window-size=1280,1600 --virtual-time-budget=5000 \
        --screenshot="docs/screenshots/$name.png" "http://127.0.0.1:$port/$url"
    rm -rf "$profile"
done
