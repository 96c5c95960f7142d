"""Run checkpoints: keep-last-N plus every K-th step, async saves, the run record, params-only loads."""
import os

import jax
import numpy as np
import optax
import pytest

from ul2lab.train import checkpoints
from ul2lab.models.config import preset


def small_state(seed):
    rng = np.random.default_rng(seed)
    params = {"encoder": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
              "scale": rng.normal(size=(3,)).astype(np.float32)}
    opt_state = optax.adafactor(1e-2, min_dim_size_to_factor=2).init(params)
    return params, opt_state


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def steps_on_disk(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_keeps_the_last_n_plus_every_kth_step_and_restores_exactly(tmp_path):
    ckpt = checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=2, keep_period=4, async_save=True)
    saved = {}
    for step in range(1, 11):
        params, opt_state = small_state(step)
        saved[step] = (params, opt_state)
        ckpt.save(step, params, opt_state, {"step": step, "rng": [0, step], "data_batches": step,
                                            "mixture_or_task_name": "m"})
    ckpt.wait()
    assert steps_on_disk(tmp_path) == [4, 8, 9, 10]
    params, opt_state = saved[8]
    got_params, got_opt, run = ckpt.restore(8, abstract(params), abstract(opt_state))
    ckpt.close()
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_opt, opt_state)
    assert run == {"step": 8, "rng": [0, 8], "data_batches": 8, "mixture_or_task_name": "m"}
    assert checkpoints.latest_run_record(str(tmp_path))["step"] == 10


def test_restore_into_another_optimizer_is_a_clear_error(tmp_path):
    params, opt_state = small_state(0)
    ckpt = checkpoints.RunCheckpoints(str(tmp_path), async_save=False)
    ckpt.save(1, params, opt_state, {"step": 1})
    ckpt.wait()
    adam_state = optax.adam(1e-3).init(params)
    with pytest.raises(checkpoints.CheckpointError, match="do not match this run's model and optimizer"):
        ckpt.restore(1, abstract(params), abstract(adam_state))
    ckpt.close()


def test_params_only_checkpoint_loads_into_a_run_and_mismatches_are_named(tmp_path):
    params, _ = small_state(3)
    checkpoints.save_params(str(tmp_path), params, preset("tiny"), step=0)
    _, restored, step = checkpoints.load_params(str(tmp_path), abstract_params=abstract(params))
    assert step == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    checkpoints.check_same_model(str(tmp_path), preset("tiny", dropout_rate=0.3))  # not a shape change
    with pytest.raises(checkpoints.CheckpointError, match="num_heads: 4 there, 8 now"):
        checkpoints.check_same_model(str(tmp_path), preset("tiny", num_heads=8))
    wrong = {"encoder": {"kernel": jax.ShapeDtypeStruct((5, 3), np.float32)},
             "scale": jax.ShapeDtypeStruct((3,), np.float32)}
    with pytest.raises(checkpoints.CheckpointError, match="do not fit this model"):
        checkpoints.load_params(str(tmp_path), abstract_params=wrong)
