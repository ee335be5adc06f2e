#!/usr/bin/env bash
# The accelerator measurements BUILD.md still lacks, in one call: precision table, training throughput
# and the paper-scale cost column, each printed and saved as OUT_DIR/<name>.txt.
#
#   bash scripts/gpu_checks.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else gpu_checks/
#   GPU_CHECKS_SMALL=1 bash scripts/gpu_checks.sh  # the same commands at CPU-sized settings (a smoke run)
#
# Budget on one H200 (from the issue's own figures; each compilation ~20-30 s): precision
# 2 estimators x 3 precisions <= 4 min, training <= 3 min, cost table <= 2 min: run it with a
# 10-minute limit. Each part has its own timeout so one slow part cannot eat the others'. Runs from the repo root with memvol
# importable (PYTHONPATH=. is set here).
set -u
out="${1:-${OUT:-gpu_checks}}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export MPLBACKEND=Agg

if [[ "${GPU_CHECKS_SMALL:-0}" == 1 ]]; then
  prec_args=(--model=small_unet@14 --estimators=paper --paper_steps=4 --num_images=2)
  train_args=(--models=small_unet@14 --batch_sizes=16 --steps_per_call=1,10 --steps=10 --rounds=1)
  cost_args=(--models=digits_mlp --cost_table)
else
  prec_args=(--model=paper_cifar10 --estimators=hutchinson,paper --paper_steps=200 --repeats=1)
  train_args=(--models=small_unet@14 --batch_sizes=64,256 --steps_per_call=1,50,200 --steps=1000 --rounds=2)
  cost_args=(--models=paper_cifar10 --cost_table)
fi

part() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$out/device.txt"
part precision 240 python scripts/bench_precision.py "${prec_args[@]}"
part train 180 python scripts/bench_train.py "${train_args[@]}"
part cost 120 python scripts/bench_volume.py "${cost_args[@]}"
