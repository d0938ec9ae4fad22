#!/usr/bin/env bash
# `make demo`: the whole product on its built-in default, no camera needed.
#
#   1. a labelled crops dataset cut by the service's locator from simulated belt frames
#   2. a short fine-tune of the ImageNet MobileNetV2 on it, then the ONNX export
#   3. the daemon on the simulated camera (`synthetic:`), the reference subscriber
#      printing its decisions, a scrape of /metrics, then a clean SIGTERM shutdown
#
# Steps 1-2 run once; their model is kept in RUN_DIR and reused.
set -euo pipefail

run_dir=${1:-runs/demo}
seconds=${2:-20}
py=.venv/bin/python
publish=tcp://127.0.0.1:5557
http=127.0.0.1:9108

mkdir -p "$run_dir"
if [ ! -s "$run_dir/model.onnx" ]; then
    echo "== 1/3 crops dataset (30 per class, cut by the locator from simulated frames)"
    $py -m training synth crops --out "$run_dir/crops" --per-class 30 --seed 0
    echo "== 2/3 fine-tune the ImageNet MobileNetV2 (a few minutes on a CPU), export to ONNX"
    $py -m training fit --data "$run_dir/crops" --out "$run_dir/train" --seed 0
    $py -m export --checkpoint "$run_dir/train/best.pt" --out "$run_dir/model.onnx"
else
    echo "== reusing $run_dir/model.onnx (delete it to retrain)"
fi
$py -m export inspect "$run_dir/model.onnx"

echo "== 3/3 the daemon on the simulated camera for ${seconds}s; decisions below"
$py -m service subscribe --connect "$publish" --topics decision --timeout $((seconds + 30)) &
subscriber=$!
$py -m service run --model "$run_dir/model.onnx" --source "synthetic:?seed=7" \
    --publish "$publish" --http "$http" &
daemon=$!
trap 'kill -TERM $daemon $subscriber 2>/dev/null || true' EXIT

sleep "$seconds"
echo "== metrics scraped from http://$http/metrics (decisions per bin and reason, drops)"
$py - "$http" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in body.splitlines():
    if line.startswith(("beltsort_decisions_total", "beltsort_frames_total",
                        "beltsort_frames_dropped_total", "beltsort_publish_dropped_total",
                        "beltsort_model_info")) and not line.endswith(" 0.0"):
        print("  " + line)
PY
kill -TERM "$daemon"
wait "$daemon"
echo "== daemon stopped cleanly (exit $?)"
kill -TERM "$subscriber" 2>/dev/null || true
wait "$subscriber" 2>/dev/null || true
trap - EXIT
