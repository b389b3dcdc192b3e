#!/usr/bin/env bash
# The accuracy results of docs/results.md on the shipped demo model: profile, scans, failure-probe on the
# first half of each domain's tasks, eval on the other half. No network. About 30-40 minutes on 2 CPU cores.
# Usage: tools/accuracy_results.sh [BANPICK] [OUT_DIR]
set -euo pipefail
BANPICK=${1:-.venv/bin/banpick}
OUT=${2:-build/accuracy}
mkdir -p "$OUT"
P="$OUT/demo.safetensors"
rm -f "$P" "$P".*.partial
export OMP_NUM_THREADS=1  # one thread: steadier timings on a shared CPU (tiny matrices gain nothing from more)

for d in math code general; do
  "$BANPICK" profile --domain "$d" --samples 256 --seq-len 128 --out "$P" --no-progress --json > "$OUT/profile-$d.json"
  "$BANPICK" kl-scan --profile "$P" --domain "$d" --samples 64 --seq-len 128 --no-progress --json > "$OUT/kl-scan-$d.json"
done
"$BANPICK" layer-sensitivity --profile "$P" --domain math --samples 64 --seq-len 128 --no-progress --json > "$OUT/layer-sensitivity.json"

# Probe on tasks 0-74 of each domain; evaluate on tasks 75-149, which the probe never saw.
for d in math code general; do
  "$BANPICK" failure-probe --profile "$P" --domain "$d" --task "$d" --limit 75 --no-progress --json > "$OUT/failure-probe-$d.json" \
    || echo "failure-probe $d: no key experts (see $OUT/failure-probe-$d.json)"
done

"$BANPICK" eval --profile "$P" --task math,code,general --offset 75 \
  --method baseline,pick,ban,banpick,des,odp,dynamic --lambda 0.5,0.6,0.7,0.8,0.9 \
  --clock cpu --repeats 3 --no-progress --json > "$OUT/eval.json"

# Pick's five strategies on the math half it was not calibrated on (Figure 4's comparison).
for s in A B C D E; do
  "$BANPICK" eval --profile "$P" --task math --offset 75 --method pick --strategy "$s" --clock cpu --no-progress --json \
    > "$OUT/eval-pick-$s.json"
done

.venv/bin/python tools/results_tables.py "$OUT"
