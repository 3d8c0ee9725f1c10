#!/usr/bin/env bash
# The README's "Run across machines" commands on loopback (/srv -> $S), with 3 data owners
# whose notes are synthetic clinic patients. Needs privlm installed (PATH). Leaves nothing running.
set -euo pipefail
: "${S:=/tmp/privlm-across-machines}"  # where the "machines" keep their files
if [ -e "$S" ]; then echo "$S exists; set S to a new directory" >&2; exit 2; fi
mkdir -p "$S"
cleanup() {
  pkill -f "flower-supernode --root-certificates $S" || true
  pkill -f "flower-superlink --ssl-certfile $S" || true
}
trap cleanup EXIT
cd "$S"
privlm certs $S/fl/certs --host 127.0.0.1
setsid flower-superlink --ssl-certfile $S/fl/certs/server.pem --ssl-keyfile $S/fl/certs/server.key \
    --ssl-ca-certfile $S/fl/certs/ca.crt --enable-supernode-auth \
    --disable-runtime-dependency-installation --host 127.0.0.1 --port 9092 > $S/superlink.log 2>&1 &
export FLWR_HOME=$S/fl/home && mkdir -p $FLWR_HOME
printf '[superlink]\ndefault = "clinics"\n\n[superlink.clinics]\naddress = "127.0.0.1:9092"\nroot-certificates = "'$S'/fl/certs/ca.crt"\n' \
    > $FLWR_HOME/config.toml
sleep 5
PORT=9094
for c in clinic-a clinic-b clinic-c; do
  mkdir -p $S/$c/notes
  # each data owner's notes: a few synthetic patients, one file each
  python - "$S/$c/notes" "$c" <<'PY'
import sys
from pathlib import Path
from privlm.data import load_corpus
corpus = load_corpus("synthetic-clinic", None, 6, abs(hash(sys.argv[2])) % 1000)
for cl in corpus.clients:
    (Path(sys.argv[1]) / f"{cl.client_id.replace('/', '_')}.txt").write_text(cl.train + "\n" + cl.test + "\n")
PY
  privlm node-key $S/$c/node-key
  cp $S/fl/certs/ca.crt $S/$c/ca.crt
  flwr supernode register $S/$c/node-key.pub clinics
  setsid flower-supernode --root-certificates $S/$c/ca.crt \
    --auth-supernode-private-key $S/$c/node-key \
    --superlink 127.0.0.1:9092 --port $PORT \
    --node-config 'data-path="'$S/$c/notes'" data-source="dir" client-id="'$c'"' > $S/$c.log 2>&1 &
  PORT=$((PORT+1))
done
printf '[data.scrub]\nenabled = true\n\n[federation]\nrounds = 3\nclients_per_round = 2\n\n[privacy]\ntarget_epsilon = 8.0\n' \
    > $S/fl/run.toml
privlm flower-app $S/fl/app
flwr run $S/fl/app clinics --run-config 'config="'$S'/fl/run.toml" run-dir="'$S'/fl/runs/r1" nodes=3'
for i in $(seq 1 120); do
  st=$(flwr ls clinics --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  case "$st" in finished:*) break;; esac; sleep 5
done
echo "status: $st"
flwr ls clinics
cat $S/fl/runs/r1/metrics.jsonl
python3 -c "import json; p=json.load(open('$S/fl/runs/r1/privacy.json')); print(p['epsilon'], p['delta'], p['population']); print(p['guarantee'][:300])"
cat $S/fl/runs/r1/scrub.json 2>/dev/null || echo "no scrub.json"
[ "$st" = "finished:completed" ]
