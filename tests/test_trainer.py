"""The training loop on synthetic packed batches: exact resume after SIGTERM, 8 devices = 1 device,
what lands in MODEL_DIR, and bad input refused before anything is written."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from test_train_step import packed_batch
from ul2lab.train import checkpoints, schedules
from ul2lab.train import loop as trainer
from ul2lab.models.config import preset

LENGTHS = {"inputs": 32, "targets": 32}


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def make_config(model_dir, **overrides):
    settings = dict(model_dir=str(model_dir), model=preset("tiny", dropout_rate=0.1),
                    mixture_or_task_name="synthetic", task_feature_lengths=LENGTHS, train_steps=6,
                    batch_size=8, learning_rate=schedules.constant_schedule(0.05), checkpoint_period=3,
                    log_period=1, async_checkpoints=True, tensorboard=False, num_devices=1,
                    mesh_shape={"data": 1, "fsdp": 1, "model": 1})
    settings.update(overrides)
    return trainer.TrainConfig(**settings)


def synthetic_batches(sigterm_at=None):
    """batches(skip): batch i is one of two fixed batches (learnable in a few steps) by i's parity, so
    skipping is exact; optionally SIGTERM while batch `sigterm_at` is drawn."""
    def batches(skip):
        index = skip
        while True:
            if index == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield packed_batch(100 + index % 2)
            index += 1
    return batches


def losses(result):
    return {r["step"]: r["loss"] for r in result["history"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    return model_dir, trainer.train(make_config(model_dir), synthetic_batches())


@pytest.mark.slow
def test_resume_after_sigterm_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
    _, full = uninterrupted
    # SIGTERM arrives while the 5th batch is drawn (batches are drawn a few ahead of the steps): the
    # step in progress finishes, is saved, and the run stops
    first = trainer.train(make_config(tmp_path), synthetic_batches(sigterm_at=4))
    assert 1 <= first["step"] <= 5 and first["preempted"]
    assert checkpoints.RunCheckpoints(str(tmp_path)).latest_step() == first["step"]
    second = trainer.train(make_config(tmp_path), synthetic_batches())
    assert second["step"] == 6
    resumed = {**losses(first), **losses(second)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == losses(full)  # exact: same batches, same dropout keys, same optimizer state
    assert losses(full)[5] < losses(full)[1] - 0.5  # the same batch, four steps later


def test_run_directory_holds_config_metrics_curve_and_checkpoints(uninterrupted):
    model_dir, full = uninterrupted
    config, payload = checkpoints.read_config(str(model_dir))
    assert config == preset("tiny", dropout_rate=0.1)
    assert payload["mixture_or_task_name"] == "synthetic"
    with open(model_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "z_loss", "grad_norm", "learning_rate"} <= set(records[0])
    assert records[0]["learning_rate"] == pytest.approx(0.05)
    assert "tokens_per_s" in records[-1]
    assert (model_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(d) for d in os.listdir(model_dir) if d.isdigit()) == [3, 6]
    _, params, _ = checkpoints.load_params(str(model_dir))  # what export-hf reads
    assert params["encoder"]["layers_0"] if "layers_0" in params.get("encoder", {}) else params
    assert "loss 5." in full["summary"] or "loss" in full["summary"]


@pytest.mark.slow
def test_eight_devices_data2_model4_match_one_device(uninterrupted, tmp_path):
    _, one = uninterrupted  # dropout keys do not depend on the sharding, so dropout stays on
    eight = trainer.train(make_config(tmp_path, num_devices=8, mesh_shape={"data": 2, "fsdp": 1, "model": 4},
                                      train_steps=3, checkpoint_period=100, async_checkpoints=False),
                          synthetic_batches())
    assert eight["num_devices"] == 8
    a, b = losses(one), losses(eight)
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=2e-5)


def test_initial_checkpoint_path_loads_params_only(uninterrupted, tmp_path):
    model_dir, full = uninterrupted
    config, params, _ = checkpoints.load_params(str(model_dir))
    checkpoints.save_params(str(tmp_path / "imported"), params, config)  # what `import-hf` writes
    result = trainer.train(make_config(tmp_path / "run", train_steps=1, async_checkpoints=False,
                                       initial_checkpoint_path=str(tmp_path / "imported")),
                           synthetic_batches())
    # the same first batch, but from the trained parameters: a fresh step counter and optimizer,
    # and a loss well below the random initialization's
    assert result["step"] == 1
    assert losses(result)[1] < losses(full)[1] - 0.5
    other = tmp_path / "other"
    checkpoints.save_params(str(other), {"not": np.zeros(3, np.float32)}, config)
    with pytest.raises(checkpoints.CheckpointError, match="do not fit this model"):
        trainer.train(make_config(tmp_path / "run2", initial_checkpoint_path=str(other)), synthetic_batches())


def test_batch_not_divisible_by_data_parallel_size_is_refused_before_work(tmp_path):
    config = make_config(tmp_path, batch_size=6, num_devices=8, mesh_shape={"data": 4, "fsdp": 1, "model": 2})
    with pytest.raises(ValueError, match="BATCH_SIZE 6 .* not divisible by the data-parallel size 4"):
        trainer.train(config, synthetic_batches())
    assert os.listdir(tmp_path) == []


def test_model_dir_of_another_model_shape_is_refused_and_left_alone(uninterrupted):
    model_dir, _ = uninterrupted
    before = {p: os.path.getmtime(os.path.join(model_dir, p)) for p in os.listdir(model_dir)}
    other = make_config(model_dir, model=preset("tiny", emb_dim=32))
    with pytest.raises(checkpoints.CheckpointError, match="another model shape .*emb_dim: 64 there, 32 now"):
        trainer.train(other, synthetic_batches())
    after = {p: os.path.getmtime(os.path.join(model_dir, p)) for p in os.listdir(model_dir)}
    assert after == before


def test_missing_task_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="MIXTURE_OR_TASK_NAME"):
        trainer.train(make_config(tmp_path, mixture_or_task_name=""), synthetic_batches())
    assert os.listdir(tmp_path) == []


def test_a_resumed_run_compiles_the_train_step_once(tmp_path, caplog):
    """The restored `step` is placed with its sharding: an unsharded one made every resume compile
    the train step twice (once for the restored state, again for the state the first step returns)."""
    import logging
    trainer.train(make_config(tmp_path, train_steps=3, async_checkpoints=False), synthetic_batches())
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            result = trainer.train(make_config(tmp_path, train_steps=6, async_checkpoints=False), synthetic_batches())
    finally:
        jax.config.update("jax_log_compiles", False)
    assert result["step"] == 6 and result["history"][0]["step"] == 4
    compiles = [r.getMessage() for r in caplog.records
                if "train_step" in r.getMessage() and r.getMessage().lstrip().startswith("Compiling")]
    assert len(compiles) == 1, compiles


def test_a_run_from_a_checkpoint_continues_the_learning_rate_schedule_of_its_step(tmp_path):
    """The step continues from INITIAL_CHECKPOINT_PATH's (t5x); optax evaluates the schedule at its own
    step counts, so those must continue too. This schedule is 0 before step 3: with counts restarted at
    0 the continued run's step 4 would not move the parameters."""
    import jax.numpy as jnp
    first = tmp_path / "first"
    trainer.train(make_config(first, train_steps=3, async_checkpoints=False), synthetic_batches())
    _, before, step = checkpoints.load_params(str(first))
    assert step == 3
    zero_then_constant = lambda count: jnp.where(count < 3, 0.0, 0.05)  # noqa: E731
    second = tmp_path / "second"
    trainer.train(make_config(second, train_steps=4, initial_checkpoint_path=str(first),
                              learning_rate=zero_then_constant, async_checkpoints=False), synthetic_batches())
    _, after, step = checkpoints.load_params(str(second))
    assert step == 4
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), before, after))
    assert any(changed)
