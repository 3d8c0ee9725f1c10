#!/usr/bin/env bash
# Shakespeare (by play and role) on one CUDA GPU, every run side by side in one time window:
#   - issue #2: non-private FedAvg, rounds to 54% next-character accuracy (two local-training settings);
#   - issue #9: the privacy-utility curve, user-level epsilon in {1, 2, 4, 8} and non-private,
#     fixed vs adaptive clipping, the same rounds for every point;
#   - issue #9: the same curve's epsilon in {2, 8} and non-private with each role cut into 4 pseudo-users.
# Each run is its own process (the simulation is launch-bound on a GPU; the processes share it).
#
#   DATA=../shared/data/shakespeare OUT=benchmarks/out/gpu BUDGET=540 bash benchmarks/gpu_shakespeare.sh
#
# Writes OUT/results.json (every run's figures, rewritten as runs report), OUT/logs.tgz, OUT/gpu.csv.
set -u
DATA=${DATA:-../shared/data/shakespeare}
OUT=${OUT:-benchmarks/out/gpu}
BUDGET=${BUDGET:-540}          # seconds for everything, set-up included
ROUNDS=${ROUNDS:-40}           # rounds of every curve point
PY=${PY:-python3}
start=$(date +%s)
mkdir -p "$OUT/res" "$OUT/logs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 > "$OUT/gpu.csv" &
smi=$!

# The CUDA run must match the CPU run before any figure counts.
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_device_and_pseudo_users.py 2>&1 | tail -3

left=$(( BUDGET - ($(date +%s) - start) - 25 ))   # 25 s to collect
minutes=$(awk -v s="$left" 'BEGIN { printf "%.2f", (s - 20) / 60 }')
COMMON=(--data "$DATA" --out "$OUT/res" --max-minutes "$minutes" --set "device=${DEVICE:-cuda}" --set eval.batch_size=256)
CURVE=(--target 2 --max-rounds "$ROUNDS" --eval-every 10)

launch() {  # NAME ARGS...
  local name=$1; shift
  timeout "$left" $PY benchmarks/fedavg_shakespeare.py --name "$name" "${COMMON[@]}" "$@" \
    > "$OUT/logs/$name.log" 2>&1 &
}

# issue #2: non-private, 4 layers x 256, until 54% or the window closes
BIG=(--set model.n_layer=4 --set model.n_embd=256 --set model.n_head=8 --max-rounds 500 --eval-every 2)
launch np-big-E5 "${BIG[@]}" --set client.local_epochs=5 --set client.lr=0.001
launch np-big-E2 "${BIG[@]}" --set client.local_epochs=2 --set client.lr=0.002

# issue #9: the curve (3 layers x 128, E = 1, B = 10, local Adam 3e-3, 123 users a round)
launch curve-inf "${CURVE[@]}"
for eps in 1 2 4 8; do
  launch "curve-fixed-$eps" "${CURVE[@]}" --set privacy.mode=user --set "privacy.target_epsilon=$eps" \
    --set privacy.clip_norm=3.0
  launch "curve-adaptive-$eps" "${CURVE[@]}" --set privacy.mode=user --set "privacy.target_epsilon=$eps" \
    --set privacy.adaptive_clipping=true --set privacy.clip_norm=1.0
done
# pseudo-users: each role's lines cut into 4; 123 pseudo-users a round
for eps in 2 8; do
  launch "pseudo4-fixed-$eps" "${CURVE[@]}" --set data.pseudo_users=4 --set privacy.mode=user \
    --set "privacy.target_epsilon=$eps" --set privacy.clip_norm=3.0
done
launch pseudo4-inf "${CURVE[@]}" --set data.pseudo_users=4

collect() {
  $PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for f in sorted((out / "res").glob("*.json")):
    d = json.loads(f.read_text())
    d.pop("config", None)
    runs[d["name"]] = d
(out / "results.json").write_text(json.dumps(runs, indent=1))
for name, d in runs.items():
    last = d["evals"][-1] if d["evals"] else {}
    print(f"{name:22s} rounds {d['rounds_run']:>4}  acc {last.get('eval_accuracy')}  eps {last.get('epsilon')}"
          f"  to54 {d['rounds_to_target']}  final {d['final']}  {d['wall_seconds']:.0f}s")
PY
}

while [ -n "$(jobs -rp | grep -v "^$smi\$")" ] && [ $(( $(date +%s) - start )) -lt $(( BUDGET - 20 )) ]; do
  sleep 15
  collect > /dev/null 2>&1
done
kill "$smi" 2>/dev/null
collect
tail -n 3 "$OUT"/logs/*.log | grep -i -B2 "error\|traceback" | head -20
tar czf "$OUT/logs.tgz" --exclude="*.safetensors" -C "$OUT" logs res
echo "total $(( $(date +%s) - start )) s"
