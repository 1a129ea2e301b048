#!/usr/bin/env bash
# GPU check: one table from one GPU in at most 8 minutes.
#
#   1. bf16 step time and peak memory, adarank vs PEFT LoRA / AdaLoRA at equal parameters
#      (scripts/bench_overhead.py --device cuda --precision bf16, GPT-2 6x512, batch 32 x 256),
#      with the per-step peak (max_memory_allocated) ratios adaptive / LoRA per schedule phase
#      (total, and minus the frozen `floor` run: the adapter-attributable part);
#   2. the `sft` recipe on the GPU (SmolLM2-135M, bf16 base, bf16-mixed);
#   3. the same recipe on a 4-bit NF4 base (model.quantization=4bit; SmolLM2 saved as a model
#      directory first), then its merged export compared with the unmerged quantized model;
#   4. a sharded strategy on one device: not implemented (adarank fit refuses FSDP/DeepSpeed
#      with allocation), so the row says so and nothing runs.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--work DIR] [--python PY] [--no-install]
#   --dry-run     print the commands and exit (no GPU needed)
#   --out DIR     gpu_check.md (the table), overhead.json, compare_4bit.json and logs.tar.gz
#                 (one log per step); default: $OUT, else runs/gpu_check
#   --work DIR    run directories and the saved model (default: a fresh temporary directory)
#   --python PY   interpreter with adarank installed (default: $PYTHON, .venv/bin/python, python3)
#   --no-install  do not try `pip install bitsandbytes` when it is missing (row 3 is then skipped)
# Exit status: 0 when every step ran, 1 when one failed or timed out, 2 without a usable GPU.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."
DEADLINE_S=480
DRY_RUN=0
NO_INSTALL=0
OUT_DIR="${OUT:-runs/gpu_check}"
WORK=""
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) NO_INSTALL=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$WORK" ]] || WORK="$(mktemp -d -u "${TMPDIR:-/tmp}/adarank_gpu_check.XXXXXX")"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export PYTHONUNBUFFERED=1

SMOL_DIR="$WORK/smollm2_bf16"
GPU=(trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed model.dtype=bfloat16
     logger.wandb=false)
HELP=scripts/_gpu_check.py  # peak / save-smollm2 / compare / table

START=$SECONDS
# run_step NAME CAP CMD... : run under `timeout` (CAP seconds, at most what is left of the
# deadline), log to $WORK/logs/NAME.log, record ok / failed (rc) / timeout in $WORK/status/NAME
run_step() {
  local name="$1" cap="$2"
  shift 2
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'; printf ' %q' timeout "$cap" "$@"; printf '\n'
    return 0
  fi
  local left=$((DEADLINE_S - (SECONDS - START)))
  ((cap < left)) || cap=$left
  if ((cap < 20)); then
    echo "skipped: the ${DEADLINE_S}s deadline is reached" > "$WORK/status/$name"
    return 0
  fi
  echo "== $name (at most ${cap}s)"
  local rc=0
  timeout "$cap" "$@" > "$WORK/logs/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    echo ok > "$WORK/status/$name"
  elif ((rc == 124)); then
    echo "timeout after ${cap}s" > "$WORK/status/$name"
  else
    echo "failed (exit $rc, see logs/$name.log)" > "$WORK/status/$name"
  fi
  echo "   $(cat "$WORK/status/$name")"
}

if [[ $DRY_RUN == 0 ]]; then
  if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); nothing to check" >&2
    exit 2
  fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $PY: torch.cuda.is_available() is False (a CPU-only torch?)" >&2
    exit 2
  fi
  if ! "$PY" -c 'import adarank, peft' 2> /dev/null; then
    echo "gpu_check: $PY cannot import adarank and peft: pip install -e '.[bench,quant,llm]'" >&2
    exit 2
  fi
  mkdir -p "$OUT_DIR" "$WORK/status" "$WORK/logs"
  nvidia-smi -L
  BNB=ok
  if ! "$PY" -c 'import bitsandbytes' 2> /dev/null; then
    BNB="skipped: bitsandbytes not installed (--no-install)"
    if [[ $NO_INSTALL == 0 ]]; then
      BNB="skipped: bitsandbytes not installable here"
      if timeout 120 "$PY" -m pip install -q 'bitsandbytes>=0.46.1' 'accelerate>=1.1' \
        > "$WORK/logs/pip_bitsandbytes.log" 2>&1 && "$PY" -c 'import bitsandbytes' 2> /dev/null; then
        BNB=ok
      fi
    fi
  fi
else
  BNB=ok
fi

run_step overhead 240 "$PY" scripts/bench_overhead.py --device cuda --precision bf16 \
  --models gpt2 --configs adaptive,fixed,lora,adalora,floor --rounds 1 --steps 30 --batch 32 --seq 256 \
  --interval 5 --json "$OUT_DIR/overhead.json"
run_step sft_bf16 180 "$PY" "$HELP" peak "$WORK/sft_bf16.peak.json" fit sft "${GPU[@]}" \
  "run.dir=$WORK/sft_bf16"
if [[ $BNB == ok ]]; then
  run_step save_smollm2 90 "$PY" "$HELP" save-smollm2 "$SMOL_DIR"
  run_step sft_4bit 180 "$PY" "$HELP" peak "$WORK/sft_4bit.peak.json" fit sft "${GPU[@]}" \
    "model.name_or_path=$SMOL_DIR" model.quantization=4bit "run.dir=$WORK/sft_4bit"
  run_step export_4bit 90 "$PY" -m adarank.cli export "$WORK/sft_4bit" --format merged \
    --dtype float32 --out "$WORK/sft_4bit_merged"
  run_step compare_4bit 90 "$PY" "$HELP" compare "$WORK/sft_4bit" "$WORK/sft_4bit_merged" \
    "$OUT_DIR/compare_4bit.json"
fi
SHARDED="not implemented: sharded training (FSDP/DeepSpeed) with rank allocation; adarank fit refuses it"
if [[ $DRY_RUN == 1 ]]; then
  echo "+ sharded: $SHARDED"
  echo "+ bitsandbytes: installed if missing (pip install 'bitsandbytes>=0.46.1'), unless --no-install"
  exit 0
fi

"$PY" "$HELP" table "$OUT_DIR" "$WORK" "$BNB" "$SHARDED" "$((SECONDS - START))"
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs
# exit 1 when a step failed or timed out (the table is printed either way)
for f in "$WORK"/status/*; do
  [[ -e "$f" ]] || continue
  case "$(cat "$f")" in ok|skipped*) ;; *) exit 1 ;; esac
done
