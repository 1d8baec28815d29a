#!/usr/bin/env bash
# The whole speedrun loop: data -> train on a training-clock budget -> sample and score every checkpoint -> curve.
#
#   ./run.sh                                   # GenEval-Shapes: the record's recipe on the GPU(s), shapes-cpu without one
#   ./run.sh --config shapes --budget 600 --out runs/mine
#   ./run.sh --per-tag 10                      # score only the first 10 prompts of each tag
#   ./run.sh --data data/shapes                # the data folder (built there if missing; default: the config's)
#   ./run.sh imagenet /path/to/imagenet/train  # GenEval's 553 prompts, scored with --backend mask2former
#
# Options: track (shapes, or imagenet SRC), --config NAME (a config in train_dit.py's CONFIGS), --budget SECONDS
# (training clock), --out DIR, --data DIR, --per-tag N (prompts per tag to score; default: the config's
# eval_per_tag), --prompts FILE (GenEval metadata to sample on; ImageNet default: the official file).
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "error: $*" >&2; exit 2; }
positive() {  # positive NAME VALUE: a number > 0, or a one-line error naming the option
  [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?$ ]] && awk -v v="$2" 'BEGIN { exit !(v > 0) }' \
    || fail "$1 must be a number > 0, got '$2'"
}
track=shapes config="" budget="" out="" per_tag="" src="" prompts="" data_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    shapes|imagenet) track=$1; shift ;;
    --src|--prompts|--config|--budget|--out|--data|--per-tag)
      [ $# -ge 2 ] || fail "$1 needs a value (see ./run.sh --help)"
      case "$1" in
        --src) src=$2 ;; --prompts) prompts=$2 ;; --config) config=$2 ;; --out) out=$2 ;; --data) data_dir=$2 ;;
        --budget) positive --budget "$2"; budget=$2 ;;
        --per-tag) [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "--per-tag must be a whole number > 0, got '$2'"; per_tag=$2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) fail "unknown option $1 (see ./run.sh --help)" ;;
    *) if [ "$track" = imagenet ] && [ -z "$src" ]; then src=$1; shift; else fail "unexpected argument $1 (see ./run.sh --help)"; fi ;;
  esac
done
if [ "$track" = imagenet ]; then
  [ -n "$src" ] || fail "imagenet needs the ImageNet train folder: ./run.sh imagenet /path/to/train"
  [ -d "$src" ] || fail "$src: not a folder (expected ImageNet train: n01440764/..., one folder per synset)"
fi
if [ -n "$prompts" ] && [ ! -f "$prompts" ]; then fail "--prompts $prompts: no such file"; fi
configs=$(grep -oP '^    "\K[\w-]+(?=": Hyperparameters\()' train_dit.py | tr '\n' ' ')
configs=${configs% }
if [ -n "$config" ] && [[ " $configs " != *" $config "* ]]; then
  fail "--config $config: not a config of train_dit.py (one of: $configs)"
fi

stage() { echo; echo "== $1"; stage_start=$SECONDS; }
took() { echo "   ($((SECONDS - stage_start)) s)"; }

PY=${PYTHON:-python3}
if ! $PY -c "import torch, open_clip, numpy, PIL, tqdm, matplotlib, scipy" 2>/dev/null; then
  stage "installing requirements (pip install -r requirements.txt; a few minutes the first time)"
  $PY -m pip install -r requirements.txt --progress-bar on
  took
fi

gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ -z "$config" ]; then
  if [ "$track" = imagenet ]; then config=imagenet; else config=$([ "$gpus" -gt 0 ] && echo shapes || echo shapes-cpu); fi
fi
read -r config_data config_track < <($PY -c "import sys, train_dit; c = train_dit.CONFIGS[sys.argv[1]]; print(c.data, c.track)" "$config")
data_dir=${data_dir:-$config_data}
[ "$config_track" = "$track" ] || fail "--config $config is a $config_track config, not $track"
out=${out:-runs/$config-$(date +%Y%m%d-%H%M%S)}
launch() {  # python on the CPU, torchrun over every GPU
  if [ "$gpus" -gt 0 ]; then NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node="$gpus" "$@"; else $PY "$@"; fi
}

if [ ! -f "$data_dir/manifest.json" ]; then
  if [ "$track" = imagenet ]; then
    stage "encoding ImageNet ($src) into $data_dir (resumes where a killed prep stopped)"
    launch data.py imagenet --src "$src" --out "$data_dir"
  else
    stage "building GenEval-Shapes data in $data_dir"
    $PY data.py shapes --out "$data_dir" --n-train "$([ "$config" = shapes-cpu ] && echo 20000 || echo 100000)"
  fi
  took
fi

stage "training: config $config, out $out"
args=(--config "$config" --data "$data_dir" --out "$out")
if [ -n "$budget" ]; then args+=(--budget-seconds "$budget"); fi
launch train_dit.py "${args[@]}"
took

stage "sampling (100 NFE) and scoring every checkpoint"
curve_args=("$out")
if [ -n "$per_tag" ]; then curve_args+=(--per-tag "$per_tag"); fi
if [ -n "$prompts" ]; then curve_args+=(--prompts "$prompts"); fi
if [ "$track" = imagenet ]; then curve_args+=(--backend mask2former); fi  # GenEval's rules, reported as geneval-m2f
$PY evaluate.py curve "${curve_args[@]}"
took

echo
echo "curve:   $out/curve.png  (table: $out/curve.csv)"
echo "log:     $out/log.txt"
echo "samples: $out/samples/<checkpoint>/"
