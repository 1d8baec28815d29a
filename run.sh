#!/usr/bin/env bash
# The whole speedrun loop: data -> train on a training-clock budget -> sample and score every checkpoint -> curve.
#
#   ./run.sh                                   # GenEval-Shapes, on the GPU(s) if any, else on the CPU
#   ./run.sh --preset shapes-gpu --budget 600 --out runs/mine
#   ./run.sh --per-tag 10                      # score only the first 10 prompts of each tag
#   ./run.sh imagenet /path/to/imagenet/train  # GenEval's 553 prompts, scored with --backend mask2former
#
# Options: track (shapes or imagenet [SRC]), --preset NAME (train_dit.py PRESETS), --budget SECONDS
# (training clock), --out DIR, --per-tag N (prompts per tag to score; default all on GPU, 5 on CPU),
# --prompts FILE (GenEval metadata to sample on; ImageNet default: the official file, downloaded once).
set -euo pipefail
cd "$(dirname "$0")"

track=shapes preset="" budget="" out="" per_tag="" src="" prompts=""
while [ $# -gt 0 ]; do
  case "$1" in
    shapes|imagenet) track=$1; shift ;;
    --src) src=$2; shift 2 ;;
    --prompts) prompts=$2; shift 2 ;;
    --track) track=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --per-tag) per_tag=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see ./run.sh --help)" >&2; exit 2 ;;
    *) if [ "$track" = imagenet ] && [ -z "$src" ]; then src=$1; shift;
       else echo "error: unexpected argument $1 (see ./run.sh --help)" >&2; exit 2; fi ;;
  esac
done
if [ "$track" = imagenet ] && [ -z "$src" ]; then
  echo "error: imagenet needs the ImageNet train folder: ./run.sh imagenet /path/to/train" >&2; exit 2
fi

PY=${PYTHON:-python3}
if ! $PY -c "import torch, torchvision, open_clip, numpy, PIL, tqdm, matplotlib" 2>/dev/null; then
  echo "== installing requirements"
  $PY -m pip install -q -r requirements.txt
fi

gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ -z "$preset" ]; then
  if [ "$track" = imagenet ]; then preset=imagenet-gpu; else preset=$([ "$gpus" -gt 0 ] && echo shapes-gpu || echo shapes-cpu); fi
fi
data_dir=$($PY -c "import train_dit; print(train_dit.PRESETS['$preset'].get('data', 'data/shapes'))")
out=${out:-runs/$preset-$(date +%Y%m%d-%H%M%S)}
if [ -z "$per_tag" ] && [ "$gpus" -eq 0 ]; then per_tag=5; fi
launch() {  # python on the CPU, torchrun over every GPU
  if [ "$gpus" -gt 0 ]; then NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node="$gpus" "$@"; else $PY "$@"; fi
}

if [ ! -f "$data_dir/manifest.json" ]; then
  if [ "$track" = imagenet ]; then
    echo "== encoding ImageNet ($src) into $data_dir (resumes where a killed prep stopped)"
    launch data.py imagenet --src "$src" --out "$data_dir"
  else
    echo "== building GenEval-Shapes data in $data_dir"
    $PY data.py shapes --out "$data_dir" --n-train "$([ "$preset" = shapes-cpu ] && echo 20000 || echo 100000)"
  fi
fi

echo "== training: preset $preset, out $out"
args=(--preset "$preset" --data "$data_dir" --out "$out")
if [ -n "$budget" ]; then args+=(--budget_seconds "$budget"); fi
launch train_dit.py "${args[@]}"

echo "== sampling (100 NFE) and scoring every checkpoint"
curve_args=("$out")
if [ -n "$per_tag" ]; then curve_args+=(--per-tag "$per_tag"); fi
if [ -n "$prompts" ]; then curve_args+=(--prompts "$prompts"); fi
if [ "$track" = imagenet ]; then curve_args+=(--backend mask2former); fi  # GenEval's rules, reported as geneval-m2f
if [ "$gpus" -gt 0 ]; then curve_args+=(--compile); fi
$PY evaluate.py curve "${curve_args[@]}"

echo
echo "curve:   $out/curve.png  (table: $out/curve.csv)"
echo "log:     $out/log.txt"
echo "samples: $out/samples/<checkpoint>/"
