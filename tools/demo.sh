#!/usr/bin/env bash
# `make demo`: the whole pipeline on the shipped demo model and its embedded data, no network needed.
# Usage: tools/demo.sh BANPICK OUT_DIR
set -euo pipefail
BANPICK=${1:-banpick}
OUT=${2:-build/demo}
mkdir -p "$OUT"
PROFILE="$OUT/demo-profile.safetensors"
rm -rf "$PROFILE" "$OUT/report" "$OUT/bundle"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: CPU-time speed ratios stay steady on a shared machine
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

for domain in math code general; do
  step "banpick profile --domain $domain   (usage counts and candidate experts)"
  "$BANPICK" profile --domain "$domain" --samples 256 --seq-len 128 --out "$PROFILE" --no-progress
done

step "banpick kl-scan --domain math   (prune each candidate, top-1000 KL of the output)"
"$BANPICK" kl-scan --profile "$PROFILE" --domain math --samples 64 --seq-len 128 --show 8 --no-progress

step "banpick layer-sensitivity   (W_l and the token ratio R, for Ban)"
"$BANPICK" layer-sensitivity --profile "$PROFILE" --domain math --samples 64 --seq-len 128 --no-progress

step "banpick failure-probe --task math   (force each candidate in on the failure set of the first 75 tasks)"
"$BANPICK" failure-probe --profile "$PROFILE" --domain math --task math --limit 75 --no-progress

step "banpick eval --task math --target-avg-topk 5   (held-out tasks 76-150: Pick, then every pruning method at 5 of 8 experts)"
"$BANPICK" eval --profile "$PROFILE" --task math --offset 75 --limit 75 \
  --method baseline,pick,fixed-k,ban,banpick,des,dynamic --target-avg-topk 5 --clock cpu

step "banpick report   (figures and one HTML page)"
"$BANPICK" report "$PROFILE" --out "$OUT/report" --no-progress

step "banpick export --target hf   (a bundle for serving)"
"$BANPICK" export "$PROFILE" --target hf --method banpick --domain math --out "$OUT/bundle"

step "banpick inspect"
"$BANPICK" inspect "$PROFILE" --domain math --top 4

printf '\nProfile: %s\nReport:  %s\nBundle:  %s\n' "$PROFILE" "$OUT/report/report.html" "$OUT/bundle"
printf 'Speed:   the eval speed column above times 64-wide demo experts (Python overhead and noise); at real shapes\n'
printf '         Ban runs 1.37x the model at 4 of 8 experts, like Fixed-K: docs/benchmarks.md, bench/bench_runtime.py\n'
