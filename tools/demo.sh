#!/usr/bin/env bash
# `make demo`: the whole pipeline on the shipped demo model and its embedded data, no network needed.
# Usage: tools/demo.sh BANPICK OUT_DIR
# Each step prints the command it runs on a line of its own ("$ ..."), exactly as it runs: copy it, run it again.
set -euo pipefail
BANPICK=${1:-banpick}
OUT=${2:-build/demo}
mkdir -p "$OUT"
PROFILE="$OUT/demo-profile.safetensors"
rm -rf "$PROFILE" "$OUT/report" "$OUT/bundle"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: CPU-time speed ratios stay steady on a shared machine

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quoted() {  # the words of a command as a shell reads them back (plain words stay plain)
  local out=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$word"); else out+=("$(printf '%q' "$word")"); fi
  done
  printf '%s' "${out[*]}"
}
run() { printf '$ %s\n' "$(quoted "$@")"; "$@"; }

for domain in math code general; do
  step "profile $domain: usage counts, and the experts $domain uses most (candidates)"
  run "$BANPICK" profile --domain "$domain" --samples 256 --seq-len 128 --out "$PROFILE" --no-progress
done

step "kl-scan math: prune each candidate, measure the top-1000 KL of the output; high-KL candidates stand out"
run "$BANPICK" kl-scan --profile "$PROFILE" --domain math --samples 64 --seq-len 128 --show 8 --no-progress

step "layer-sensitivity: each layer's KL when cut from 8 to 3 experts (W), and the token ratio R, for Ban"
run "$BANPICK" layer-sensitivity --profile "$PROFILE" --domain math --samples 64 --seq-len 128 --no-progress

step "failure-probe math: force each candidate in on the tasks the model fails (of the first 75); keep the key experts"
run "$BANPICK" failure-probe --profile "$PROFILE" --domain math --task math --limit 75 --no-progress

step "eval math: held-out tasks 76-150, Pick, then every pruning method at the same budget (5 of 8 experts)"
run "$BANPICK" eval --profile "$PROFILE" --task math --offset 75 --limit 75 \
  --method baseline,pick,fixed-k,ban,banpick,des,dynamic --target-avg-topk 5 --clock cpu

step "report: figures and one HTML page"
run "$BANPICK" report "$PROFILE" --out "$OUT/report" --no-progress

step "export: a serving bundle for transformers (Ban&Pick, math)"
run "$BANPICK" export "$PROFILE" --target hf --method banpick --domain math --out "$OUT/bundle"

step "inspect: what the profile holds, and which stage found what"
run "$BANPICK" inspect "$PROFILE" --domain math --top 4

printf '\nProfile: %s\nReport:  %s\nBundle:  %s\n' "$PROFILE" "$OUT/report/report.html" "$OUT/bundle"
