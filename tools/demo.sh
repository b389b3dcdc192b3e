#!/usr/bin/env bash
# `make demo`: the main job on the shipped demo model and its embedded data, no network needed.
# Usage: tools/demo.sh BANPICK OUT_DIR
set -euo pipefail
BANPICK=${1:-banpick}
OUT=${2:-build/demo}
mkdir -p "$OUT"
PROFILE="$OUT/demo-profile.safetensors"
rm -f "$PROFILE"

for domain in math code general; do
  echo "== banpick profile --domain $domain"
  "$BANPICK" profile --model demo --domain "$domain" --samples 256 --seq-len 128 --out "$PROFILE" --no-progress
done

echo "== banpick inspect"
"$BANPICK" inspect "$PROFILE" --domain math --top 4
echo
echo "Routing profile written to $PROFILE"
