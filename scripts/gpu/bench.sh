#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), with .whl carried (bash scripts/gpu/prepare.sh made it here):
#   bash scripts/gpu/bench.sh main    # ~6 min on one H200: paper settings (100 iterations, batch 16)
#   bash scripts/gpu/bench.sh rest    # ~6 min: OTMF levers, every other continual method, TF32, ViT-L/14
#   bash scripts/gpu/bench.sh smoke   # CPU check of this script (tiny tower, seconds per part)
# Each part writes $OUT/<part>/benchmarks.json as soon as it finishes (a run cut short keeps what it
# measured); copy them to benchmarks/gpu_h200/ here and run `python scripts/bench.py --render-only`.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-main}
OUT=${OUT:-/tmp/otmf_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && [ "$WHAT" != smoke ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl failed (run scripts/gpu/prepare.sh here and carry .whl)"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
"$PY" -c "import otmf_exp, hydra, geomloss, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "error: the package does not import here"; exit 3; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"
START=$(date +%s)
BUDGET=${BUDGET:-540}   # seconds for this call's parts; each part gets what is left
part() {  # part NAME [bench.py args...]: one bench run in its own out dir, cut at the remaining budget
  local name=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then echo "skip $name: ${left}s left"; return; fi
  echo "== $name (${left}s left)"
  timeout "$left" "$PY" scripts/bench.py "$@" --out "$OUT/$name" || echo "part $name ended with $?"
  [ -f "$OUT/$name/benchmarks.partial.json" ] && mv "$OUT/$name/benchmarks.partial.json" "$OUT/$name/benchmarks.json"
  rm -f "$OUT/$name/BENCHMARKS.md"
}
case "$WHAT" in
  main)
    part b32_main --device cuda --only step,ratio --methods "otmf,adamerging (task),opcm"
    ;;
  rest)
    part b32_levers --device cuda --quick --only step \
      --methods "otmf,otmf (checkpoint_blocks=true),otmf (checkpoint_blocks=false),otmf (adam_in_backward=false),otmf (best_masks=copy),otmf (student_weights=all),otmf (eval_batches=4)"
    part b32_methods --device cuda --quick --only step \
      --methods "averaging,task_arithmetic,ties,magmax,adamerging (layer),c_adamerging,mingle,dop,consensus,wemoe,continual_finetune"
    echo "== tf32"; mkdir -p "$OUT/tf32"
    timeout $((BUDGET - ($(date +%s) - START))) "$PY" scripts/gpu/tf32.py --out "$OUT/tf32" --device cuda --iterations 100 \
      || echo "tf32 ended with $?"
    part l14 --device cuda --quick --arch vit_l14 --only step --methods "otmf,opcm"
    ;;
  smoke)
    BUDGET=${BUDGET:-600}
    part smoke_step --device cpu --quick --arch tiny --only step --methods "otmf,opcm,adamerging (task)"
    part smoke_ratio --device cpu --quick --arch tiny --only ratio
    mkdir -p "$OUT/smoke_tf32"
    "$PY" scripts/gpu/tf32.py --out "$OUT/smoke_tf32" --device cpu --arch tiny --iterations 2 --tasks 2
    ;;
  *) echo "error: unknown part $WHAT; use main, rest or smoke"; exit 2 ;;
esac
ls -la "$OUT"/*/benchmarks.json 2>/dev/null
echo "done in $(($(date +%s) - START)) s"
