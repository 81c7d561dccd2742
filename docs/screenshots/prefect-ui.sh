#!/bin/bash
# Run from the repository root after `make setup` and `apt-get install chromium`; PNGs land in /tmp/shots.
# Prefect UI screenshots of a batch with failed slides (issue 12 "Done when").
set -u
cd /work/main
export WSIFLOW_HOME=/tmp/shots-site PREFECT_HOME=/tmp/shots-prefect
rm -rf /tmp/shots-site /tmp/shots-prefect /tmp/shots-out; mkdir -p /tmp/shots
PORT=4299
.venv/bin/wsiflow server --port $PORT > /tmp/shots/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:$PORT/api/health >/dev/null && break; sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
D=/work/shared/data
.venv/bin/wsiflow batch $D/slides/CMU-1-Small-Region.svs $D/bad/unreadable-corrupt-tile.svs $D/slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs $D/bad/not-a-tiff.svs \
  --out /tmp/shots-out --stride 112 > /tmp/shots/batch.out 2> /tmp/shots/batch.err
echo "batch rc=$?"
FLOW=$(curl -s -X POST $PREFECT_API_URL/flow_runs/filter -H 'content-type: application/json' -d '{"limit":1,"sort":"START_TIME_DESC"}' | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['id'])")
shot() { chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --hide-scrollbars --window-size=1600,1100 --virtual-time-budget=20000 \
  --screenshot=/tmp/shots/$1.png "$2" > /dev/null 2>&1; echo "shot $1"; }
shot flowrun "http://127.0.0.1:$PORT/runs/flow-run/$FLOW"
shot flowrun-artifacts "http://127.0.0.1:$PORT/runs/flow-run/$FLOW?tab=Artifacts"
shot flowrun-tasks "http://127.0.0.1:$PORT/runs/flow-run/$FLOW?tab=Task+Runs"
shot dashboard "http://127.0.0.1:$PORT/dashboard"
ART=$(curl -s -X POST $PREFECT_API_URL/artifacts/filter -H 'content-type: application/json' -d '{"limit":5}' | python3 -c "import json,sys; a=[x for x in json.load(sys.stdin) if x['key']=='wsiflow-batch']; print(a[0]['id'] if a else '')")
[ -n "$ART" ] && shot artifact "http://127.0.0.1:$PORT/artifacts/artifact/$ART"
kill $SERVER; wait $SERVER 2>/dev/null
