"""Training FLOPs of the encoder-decoder and model FLOPs utilization (MFU).

Counted: every matmul of the network, at 2 FLOPs per multiply-add, as the hardware executes it:
  encoder layer   q/k/v/o projections, attention scores (q.k) and weighted sums (p.v) over all
                  inputs_length positions, the MLP (gated: wi_0, wi_1, wo = 3 matrices)
  decoder layer   self-attention as above over targets_length positions (the causal mask is
                  applied to a full score matrix, so no half is skipped), cross-attention q/o on
                  the targets and k/v on all inputs_length encoder outputs, scores and sums over
                  the encoder positions, the MLP
  logits          targets_length x emb_dim x vocab_size (tied or untied: one matmul either way)
Not counted: embedding lookups, norms, activations, softmax, relative position biases, loss (all
O(length x emb_dim), well under 1%). Training = 3 x forward (backward = 2 x forward).

With this convention a T5.1.1-base example at inputs 512 / targets 114 costs 425.9 GFLOP and
T5.1.1-large 1.468 TFLOP, the figures in the trainer issue.
"""
from typing import Optional

from ul2lab.models.config import T5Config

# Dense bf16 peak FLOP/s per device, by substrings of jax's `device.device_kind` (lower case).
# First match wins, so more specific names come first.
PEAK_FLOPS_PER_DEVICE = (
    ("h200", 989e12),
    ("h100", 989e12),        # SXM; the PCIe card is slower (756e12): override with peak_flops=
    ("a100", 312e12),
    ("v5 lite", 197e12),     # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),      # TPU v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("v6 lite", 918e12),     # TPU v6e (Trillium)
)


def forward_flops_per_example(config: T5Config, inputs_length: int, targets_length: int) -> float:
    """Forward-pass matmul FLOPs of one (inputs_length, targets_length) example."""
    if inputs_length <= 0 or targets_length <= 0:
        raise ValueError(f"feature lengths must be positive, got inputs {inputs_length}, "
                         f"targets {targets_length}")
    d, inner = config.emb_dim, config.num_heads * config.head_dim
    mlp = len(config.mlp_activations) * d * config.mlp_dim + config.mlp_dim * d
    projections = 4 * d * inner                      # q, k, v, out

    def attention(queries, keys):                    # scores and weighted sums
        return 2 * queries * keys * inner

    encoder_layer = inputs_length * (projections + mlp) + attention(inputs_length, inputs_length)
    decoder_layer = (targets_length * (projections + mlp) + attention(targets_length, targets_length)
                     + targets_length * 2 * d * inner          # cross-attention q, out
                     + inputs_length * 2 * d * inner           # cross-attention k, v on the encoder
                     + attention(targets_length, inputs_length))
    logits = targets_length * d * config.vocab_size
    multiply_adds = (config.num_encoder_layers * encoder_layer + config.num_decoder_layers * decoder_layer
                     + logits)
    return 2.0 * multiply_adds


def train_flops_per_example(config: T5Config, inputs_length: int, targets_length: int) -> float:
    """Forward + backward FLOPs of one example: 3 x forward."""
    return 3.0 * forward_flops_per_example(config, inputs_length, targets_length)


def train_flops_per_step(config: T5Config, batch_size: int, inputs_length: int, targets_length: int) -> float:
    """FLOPs of one training step over the global batch (packed examples count at full length)."""
    return batch_size * train_flops_per_example(config, inputs_length, targets_length)


def peak_flops_per_device(device_kind: Optional[str] = None, override: Optional[float] = None) -> Optional[float]:
    """Peak bf16 FLOP/s of one device: `override` if given, else looked up by device kind
    (jax.devices()[0].device_kind by default). None for CPUs and unknown devices (no MFU shown)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    if device_kind is None:
        import jax
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    for key, peak in PEAK_FLOPS_PER_DEVICE:
        if key in kind:
            return peak
    return None


def mfu(flops_per_step: float, step_time: float, num_devices: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization in [0, 1]: achieved FLOP/s over the devices' peak. None without a peak."""
    if peak is None or step_time <= 0:
        return None
    return flops_per_step / step_time / (num_devices * peak)
