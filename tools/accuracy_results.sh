#!/usr/bin/env bash
# The accuracy results of docs/results.md on the shipped demo model: profile, scans, failure-probe on the
# first half of each domain's tasks, eval on the other half. No network. About 30-40 minutes on 2 CPU cores.
# Usage: tools/accuracy_results.sh [BANPICK] [OUT_DIR]
#   MODEL=dir DATA=dir tools/accuracy_results.sh ...   another model with <DATA>/<domain>/{calib,tasks}.jsonl
set -euo pipefail
BANPICK=${1:-.venv/bin/banpick}
OUT=${2:-build/accuracy}
MODEL=${MODEL:-demo}
mkdir -p "$OUT"
P="$OUT/demo.safetensors"
rm -f "$P" "$P".*.partial
export OMP_NUM_THREADS=1  # one thread: steadier timings on a shared CPU (tiny matrices gain nothing from more)
data() { if [ -n "${DATA:-}" ]; then echo "--data $DATA/$1/calib.jsonl"; fi; }
task() { if [ -n "${DATA:-}" ]; then echo "$DATA/$1/tasks.jsonl"; else echo "$1"; fi; }

for d in math code general; do
  "$BANPICK" profile --model "$MODEL" --domain "$d" $(data "$d") --samples 256 --seq-len 128 --out "$P" --no-progress --json > "$OUT/profile-$d.json"
  "$BANPICK" kl-scan --model "$MODEL" --profile "$P" --domain "$d" $(data "$d") --samples 64 --seq-len 128 --no-progress --json > "$OUT/kl-scan-$d.json"
done
"$BANPICK" layer-sensitivity --model "$MODEL" --profile "$P" --domain math $(data math) --samples 64 --seq-len 128 --no-progress --json > "$OUT/layer-sensitivity.json"

# Probe on tasks 0-74 of each domain; evaluate on tasks 75-149, which the probe never saw.
for d in math code general; do
  "$BANPICK" failure-probe --model "$MODEL" --profile "$P" --domain "$d" --task "$(task "$d")" --limit 75 --no-progress --json \
    > "$OUT/failure-probe-$d.json" || echo "failure-probe $d: nothing probed (see above)"
done

"$BANPICK" eval --model "$MODEL" --profile "$P" --task "$(task math),$(task code),$(task general)" --offset 75 \
  --method baseline,pick,ban,banpick,des,odp,dynamic --lambda 0.5,0.6,0.7,0.8,0.9 $(data math | sed 's/--data/--calib-data/') \
  --clock cpu --repeats 3 --no-progress --json > "$OUT/eval.json"

# Matched budgets: Fixed-K, Ban, Ban&Pick, DES and Dynamic at 4, 5 and 6 experts per token (knobs solved on
# calibration text), each row with its 95% interval and McNemar p against the baseline.
for t in 4 5 6; do
  "$BANPICK" eval --model "$MODEL" --profile "$P" --task "$(task math),$(task code),$(task general)" --offset 75 \
    --method baseline,fixed-k,ban,banpick,des,dynamic --target-avg-topk "$t" $(data math | sed 's/--data/--calib-data/') \
    --clock cpu --no-progress --json > "$OUT/eval-budget-$t.json"
done

# Pick's five strategies on the math half it was not calibrated on (Figure 4's comparison).
for s in A B C D E; do
  "$BANPICK" eval --model "$MODEL" --profile "$P" --task "$(task math)" --offset 75 --method pick --strategy "$s" \
    --clock cpu --no-progress --json > "$OUT/eval-pick-$s.json"
done

.venv/bin/python tools/results_tables.py "$OUT"
