#!/usr/bin/env bash
# One GPU, under 10 minutes: the fused packed-T5 attention (attention_impl=pallas, Triton kernels)
# checked against the XLA reference on the GPU, then training throughput at inputs 512 / targets 114,
# bf16: T5-base with the fused path and the HF transformers peer (torch.compile, bf16 autocast,
# fused AdamW) at the same batch in the same process, T5-base with the XLA path, T5-large fused.
#
#   bash bench/gpu_check.sh              # JSON lines go to $OUT/gpu_check.jsonl (./gpu_results if unset)
#   bash bench/gpu_check.sh --dry-run    # the same steps on the CPU at tiny shapes (kernels interpreted,
#                                        # HF peer eager): checks the script, measures nothing
#
# Every line of gpu_check.jsonl is one JSON object tagged with its "step": seq_per_s, tokens_per_s,
# mfu, peak_memory_bytes, compile_s (and the peer's under "hf", with ratio_ours_over_hf), or the
# attention check's errors and forward+backward times. All training steps use AdamW (the peer's
# optimizer) and no remat, so the three T5-base numbers compare like with like.
#
# Needs jax (with CUDA), flax, optax, orbax; torch + transformers only for the peer (skipped
# cleanly if absent). Every step runs under `timeout`, inside one overall budget, so a failure or
# a hang costs at most its own slot; later, lower-priority steps are skipped when time runs out.
# Fallback batches run only when the first choice produced no result (e.g. out of memory).
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "bench/gpu_check.sh: unknown argument '$arg'; the only option is --dry-run" >&2; exit 2 ;;
  esac
done
[[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]] && DRY_RUN=1
OUT_DIR="${OUT:-./gpu_results}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.jsonl"
LOG="$OUT_DIR/gpu_check.log"
: > "$RESULTS"
: > "$LOG"
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"   # leaves headroom under a 10-minute slot
# a dry run's wall time is the shared CPU's, not the script's: its limits stretch by this factor
LIMIT_SCALE=1
if (( DRY_RUN )); then
  LIMIT_SCALE="${GPU_CHECK_DRY_RUN_SCALE:-8}"
  BUDGET_S="${GPU_CHECK_BUDGET_S:-$(( 570 * LIMIT_SCALE ))}"
fi
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_step NAME SECONDS CMD...: runs CMD under timeout (capped by the budget left); its JSON lines
# (stdout lines starting with '{') are tagged with the step name and appended to $RESULTS.
run_step() {
  local name="$1" limit=$(( $2 * LIMIT_SCALE )); shift 2
  local left; left=$(remaining)
  if (( left < 30 )); then
    echo "{\"step\": \"$name\", \"skipped\": \"out of time budget\"}" | tee -a "$RESULTS"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG" >&2
  local t0=$SECONDS out rc
  out=$(timeout --kill-after=10 "$limit" "$@" 2>>"$LOG"); rc=$?
  local json; json=$(printf '%s\n' "$out" | grep '^{' || true)
  if [[ -n "$json" ]]; then
    printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    record = json.loads(line)
    print(json.dumps({"step": sys.argv[1], "seconds": int(sys.argv[2]), **record}))' \
      "$name" "$((SECONDS - t0))" | tee -a "$RESULTS"
  fi
  if (( rc != 0 )) || [[ -z "$json" ]]; then
    echo "{\"step\": \"$name\", \"failed\": true, \"exit_code\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$LOG\"}" | tee -a "$RESULTS"
    tail -n 5 "$LOG" >&2
    return 1
  fi
}

BENCH=(python3 bench/train_throughput.py --inputs_length 512 --targets_length 114 --dtype bfloat16
       --optimizer adamw --remat_policy none --steps 15 --warmup_steps 3)
ATTENTION=(python3 bench/attention_check.py --batch 8 --steps 10)
PEER=(--peer hf --peer_compile)
BASE=t5_1_1_base LARGE=t5_1_1_large
BASE_BATCH=128 BASE_FALLBACK=64 LARGE_BATCH=64 LARGE_FALLBACK=32
if (( DRY_RUN )); then
  # CPU, tiny shapes, same steps: the pallas kernels run in interpret mode; the peer runs eager
  # (torch.compile on a CPU would only add minutes of C++ compiling)
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  BENCH=(python3 bench/train_throughput.py --inputs_length 32 --targets_length 8 --dtype bfloat16
         --optimizer adamw --remat_policy none --steps 2 --warmup_steps 1)
  ATTENTION=(python3 bench/attention_check.py --batch 5 --heads 2 --head_dim 12 --inputs_length 37
             --targets_length 23 --steps 1)
  PEER=(--peer hf)
  BASE=tiny LARGE=tiny
  BASE_BATCH=4 BASE_FALLBACK=2 LARGE_BATCH=4 LARGE_FALLBACK=2
fi

# 0. what we run on
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || true
run_step environment 60 python3 -c '
import json, jax, flax, optax
print(json.dumps({"devices": [d.device_kind for d in jax.devices()], "backend": jax.default_backend(),
                  "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}))'

# 1. the fused kernels as Triton compiles them vs the XLA reference: output and gradient errors
#    (bf16 and f32; encoder, decoder, cross; packed rows with 1-5 segments and padding), and the
#    forward+backward time of each path at T5-base's heads, head_dim and lengths
run_step pallas_vs_xla_attention 120 "${ATTENTION[@]}"

# 2. T5-base, fused path, with the HF peer at the same batch in the same process (ratio)
if ! python3 -c 'import torch, transformers' >/dev/null 2>&1; then
  echo '{"step": "hf_peer", "skipped": "torch or transformers not installed"}' | tee -a "$RESULTS"
  PEER=()
fi
run_step t5_base_pallas_vs_hf 240 "${BENCH[@]}" --model $BASE --batch_size $BASE_BATCH --attention_impl pallas \
    "${PEER[@]}" ||
  run_step t5_base_pallas_vs_hf_b$BASE_FALLBACK 150 "${BENCH[@]}" --model $BASE --batch_size $BASE_FALLBACK \
    --attention_impl pallas "${PEER[@]}"

# 3. T5-base, XLA path (the reference: materialized (batch, heads, q, k) logits, bias and mask)
run_step t5_base_xla 120 "${BENCH[@]}" --model $BASE --batch_size $BASE_BATCH --attention_impl xla ||
  run_step t5_base_xla_b$BASE_FALLBACK 90 "${BENCH[@]}" --model $BASE --batch_size $BASE_FALLBACK --attention_impl xla

# 4. T5-large, fused path
run_step t5_large_pallas 170 "${BENCH[@]}" --model $LARGE --batch_size $LARGE_BATCH --attention_impl pallas ||
  run_step t5_large_pallas_b$LARGE_FALLBACK 120 "${BENCH[@]}" --model $LARGE --batch_size $LARGE_FALLBACK \
    --attention_impl pallas

echo "== done in $(( $(date +%s) - START ))s; results: $RESULTS" >&2
