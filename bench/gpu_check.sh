#!/usr/bin/env bash
# One GPU, under 10 minutes: cuDNN-vs-XLA attention gradients, T5-base and T5-large training
# throughput (inputs 512 / targets 114, cuDNN attention), and the HF transformers T5-base peer
# (torch.compile, bf16 autocast, fused AdamW) with ours at the same batch in the same process.
#
#   bash bench/gpu_check.sh            # JSON lines go to $OUT/gpu_check.jsonl (./gpu_results if unset)
#
# Needs jax (with CUDA), flax, optax, orbax; torch + transformers only for the peer (skipped
# cleanly if absent). Every step runs under `timeout`, inside one overall budget, so a failure or
# a hang costs at most its own slot; later, lower-priority steps are skipped when time runs out.
# Fallback batches run only when the first choice produced no result (e.g. out of memory).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_results}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.jsonl"
LOG="$OUT_DIR/gpu_check.log"
: > "$RESULTS"
: > "$LOG"
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"   # leaves headroom under a 10-minute slot
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_step NAME SECONDS CMD...: runs CMD under timeout (capped by the budget left); its JSON lines
# (stdout lines starting with '{') are tagged with the step name and appended to $RESULTS.
run_step() {
  local name="$1" limit="$2"; shift 2
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
       --attention_impl cudnn --steps 15 --warmup_steps 3)
BASE=t5_1_1_base LARGE=t5_1_1_large
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then  # CPU smoke test of this script: tiny shapes, same steps
  BENCH=(python3 bench/train_throughput.py --inputs_length 64 --targets_length 16 --steps 2 --warmup_steps 1)
  BASE=tiny LARGE=tiny
fi

# 0. what we run on
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || true
run_step environment 60 python3 -c '
import json, jax, flax, optax
print(json.dumps({"devices": [d.device_kind for d in jax.devices()], "backend": jax.default_backend(),
                  "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}))'

# 1. cuDNN fused attention (with the bf16 relative-position bias) vs XLA attention: gradients of the
#    training loss on a small shape. The bf16-vs-f32 XLA difference is printed as the noise floor.
run_step cudnn_vs_xla_gradients 90 python3 - <<'EOF'
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "bench")
from train_throughput import synthetic_batch
from ul2lab.train import step as train_step
from ul2lab.models import layers, loss as loss_lib, network
from ul2lab.models.config import preset

if jax.default_backend() == "cpu":  # dry run of the same code path without a GPU
    layers.FUSED_ATTENTION_BACKEND = "xla"
base = preset("t5_1_1_small", num_encoder_layers=2, num_decoder_layers=2, vocab_size=1024, dtype="bfloat16")
batch = synthetic_batch(jax.random.PRNGKey(1), 4, 256, 64, base.vocab_size)
factor, _ = loss_lib.get_loss_normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", batch)
params = network.init_params(base, jax.random.PRNGKey(0))

def grads(config):
    loss_fn = train_step.make_loss_fn(network.Transformer(config), z_loss=1e-4, label_smoothing=0.0)
    (loss, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, factor, None)
    return float(loss), jax.device_get(g)

def max_rel_diff(a, b):
    """max over parameters of max|a - b| / max|b|, and the worst parameter."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_leaves(b)
    diffs = {jax.tree_util.keystr(p): float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
             for (p, x), y in zip(flat_a, flat_b)}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst

loss_cudnn, g_cudnn = grads(base.replace(attention_impl="cudnn"))
loss_xla, g_xla = grads(base.replace(attention_impl="xla"))
loss_f32, g_f32 = grads(base.replace(attention_impl="xla", dtype="float32"))
rel, worst = max_rel_diff(g_cudnn, g_xla)
floor, floor_worst = max_rel_diff(g_xla, g_f32)
finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(g_cudnn))
print(json.dumps({"loss_cudnn": loss_cudnn, "loss_xla": loss_xla, "loss_xla_f32": loss_f32,
                  "grad_max_rel_diff_cudnn_vs_xla": rel, "worst_param": worst,
                  "grad_max_rel_diff_xla_bf16_vs_f32": floor, "floor_worst_param": floor_worst,
                  "cudnn_grads_finite": finite, "fused_backend": layers.FUSED_ATTENTION_BACKEND}))
EOF

# 2. T5-base, ours: batch 128 without remat (cuDNN attention keeps no score matrices); fallback 64.
run_step t5_base_ours 150 "${BENCH[@]}" --model $BASE --batch_size 128 --remat_policy none ||
  run_step t5_base_ours_b64 100 "${BENCH[@]}" --model $BASE --batch_size 64 --remat_policy none

# 3. T5-large, ours: batch 64 without remat; fallback batch 128 with full remat.
run_step t5_large_ours 170 "${BENCH[@]}" --model $LARGE --batch_size 64 --remat_policy none ||
  run_step t5_large_ours_b128_remat 150 "${BENCH[@]}" --model $LARGE --batch_size 128 --remat_policy full

# 4. HF transformers T5-base peer (compiled) and ours at the same batch, same process: ratio.
if python3 -c 'import torch, transformers' >/dev/null 2>&1; then
  run_step t5_base_vs_hf 240 "${BENCH[@]}" --model $BASE --batch_size 64 --remat_policy none \
    --optimizer adamw --peer hf --peer_compile
else
  echo '{"step": "t5_base_vs_hf", "skipped": "torch or transformers not installed"}' | tee -a "$RESULTS"
fi

echo "== done in $(( $(date +%s) - START ))s; results: $RESULTS" >&2
