"""FSDP over 8 CPU devices: each device holds at most 1/8 x 1.1 of the replicated TrainState.

The trainer's step is compiled for abstract T5.1.1-base-wide shapes (1 encoder + 1 decoder layer
and an 8k vocabulary keep the compile short on 2 cores; every matrix keeps base's widths) and XLA's
memory analysis of the executable says how many argument bytes one device holds (ul2lab/memory.py).
Compile only: nothing is allocated or trained. bench/fsdp_memory.py reports base/large/xl figures.
"""
import jax
import pytest
from flax import linen as nn

from ul2lab.train import memory
from ul2lab.models.config import preset
from ul2lab.models.network import abstract_params


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_fsdp_state_per_device_is_an_eighth_of_replicated(optimizer):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    config = preset("t5_1_1_base", num_encoder_layers=1, num_decoder_layers=1, vocab_size=8192)
    result = memory.compiled_state_memory(
        config, {"data": 1, "fsdp": -1, "model": 1}, "fsdp", optimizer=optimizer,
        batch_size=8, inputs_length=16, targets_length=8)
    assert result["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
    per_device, replicated = result["state_bytes_per_device"], result["state_bytes_total"]
    # the executable's own figure agrees with what the shardings say one device holds ...
    assert per_device == pytest.approx(result["state_bytes_per_device_from_shardings"], rel=1e-3)
    # ... and that is an eighth of the replicated state, give or take the small replicated leaves
    # (Adafactor's factored row/column statistics, relative position tables, step, rng)
    assert per_device <= replicated / 8 * 1.1, (per_device, replicated)
    assert per_device >= replicated / 8 * 0.99  # not trivially small: the state is really there
    # the measure includes the optimizer: AdamW adds two full-size moments per parameter,
    # Adafactor only factored statistics
    params_bytes = sum(leaf.size * leaf.dtype.itemsize
                       for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(abstract_params(config))))
    moments = {"adamw": 2.0, "adafactor": 0.0}[optimizer]
    assert replicated == pytest.approx((1 + moments) * params_bytes, rel=0.02)
