#!/usr/bin/env bash
# A model for one simulated line, made the way a plant makes one, then measured:
#
#   bench/line_model.sh LINE [OUT]        e.g. bench/line_model.sh 4321
#
# 1. for every palette colour, three recordings of that colour alone on line
#    LINE (its belt, light, zinc and camera; other screws in each): training
#    (16 s, seeds 101-120), validation (16 s, 201-220), test (10 s, 301-320);
# 2. `python -m training cut` on each, at most 30 crops a colour, 2 a screw;
# 3. fit, export, evaluate on the test crops;
# 4. the daemon on the line's own 60 s footage with all colours mixed
#    (`synth video --seed LINE`), scored by bench/daemon_e2e.py.
#
# About 30 minutes alone on a 2-core CPU: rendering and cutting ~15, fit ~8, the rest ~5.
# Everything goes under OUT (default runs/line-LINE); steps already done are kept.
set -euo pipefail

line=${1:?usage: bench/line_model.sh LINE [OUT]}
out=${2:-runs/line-$line}
py=${PYTHON:-.venv/bin/python}
colours=$($py -c "from service.palette import default_labels; print(' '.join(default_labels()))")

mkdir -p "$out/rec"
footage="$out/belt$line.mp4"
[ -s "$footage" ] || $py -m training synth video --out "$footage" --seconds 60 --seed "$line"

i=0
for colour in $colours; do
    i=$((i + 1))
    for set in train:100:16 val:200:16 test:300:10; do
        IFS=: read -r name base seconds <<<"$set"
        video="$out/rec/${name}_$colour.mp4"
        [ -s "$video" ] || $py -m training synth video --out "$video" --seconds "$seconds" \
            --only "$colour" --line "$line" --seed $((base + i)) >/dev/null
        $py -m training cut --video "$video" --label "$colour" --out "$out/$name" --max 30
    done
done

$py -m training fit --data "$out/train" --val "$out/val" --out "$out/run" --seed 0
$py -m export --checkpoint "$out/run/best.pt" --out "$out/run/model.onnx" --force
$py -m training evaluate --model "$out/run/model.onnx" --data "$out/test" --out "$out/run/test"
$py bench/daemon_e2e.py --model "$out/run/model.onnx" --video "$footage" --json "$out/run/e2e.json"
