"""A t5x user's habits, unchanged: task modules (MIXTURE_OR_TASK_MODULE), t5x's macros, evaluation
during training (EVAL_PERIOD: training_eval/ and inference_eval/), the step continuing from
INITIAL_CHECKPOINT_PATH, hints for t5x's configurables and gin files, `infer` on a seqio task, and
a command line of t5x's README with only the gin file paths changed."""
import contextlib
import dataclasses
import io
import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2lab.cli import main as cli
from ul2lab.train import checkpoints, schedules

VOCAB_SIZE = 512
LENGTHS = {"inputs": 32, "targets": 16}

# a t5x user's task module: importing it registers the task (two splits, metric functions)
TASK_MODULE = '''
import numpy as np
import seqio
import tensorflow as tf

NAME = {name!r}


def _examples(split, shuffle_files=False, seed=None):
    rng = np.random.default_rng(0 if split == "train" else 1)
    inputs = [rng.integers(3, 512, int(rng.integers(6, 20))).astype(np.int32) for _ in range(64 if split == "train" else 16)]
    return tf.data.Dataset.from_generator(
        lambda: ({{"inputs": x, "targets": x[: len(x) // 2][::-1].copy()}} for x in inputs),
        output_signature={{"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)}})


def exact_match(targets, predictions):
    return {{"exact_match": 100.0 * float(np.mean([list(t) == list(p) for t, p in zip(targets, predictions)]))}}


def mean_log_likelihood(targets, scores):
    return {{"mean_log_likelihood": float(np.mean(scores))}}


vocabulary = seqio.PassThroughVocabulary(512, eos_id=1)
seqio.TaskRegistry.add(
    NAME, seqio.FunctionDataSource(_examples, splits=["train", "validation"]),
    preprocessors=[seqio.preprocessors.append_eos{cache}],
    output_features={{k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}},
    metric_fns=[exact_match, mean_log_likelihood])
'''


def write_task_module(folder, module, task, cacheable=False):
    """A module file in `folder` (put on sys.path) registering `task` when imported."""
    cache = ", seqio.CacheDatasetPlaceholder()" if cacheable else ""
    (folder / f"{module}.py").write_text(TASK_MODULE.format(name=task, cache=cache))


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def modules_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_modules")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def train_args(model_dir, *extra, steps=4):
    return ["train", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain_ul2.gin",
            f"--gin.MODEL_DIR={model_dir}", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.TrainConfig.log_period=1",
            "--gin.TrainConfig.num_devices=1", "--gin.TrainConfig.checkpoint_period=2",
            "--gin.TrainConfig.learning_rate=@constant_schedule()",
            "--gin.constant_schedule.value=0.05", *extra]


def records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def scalars(folder):
    """{(step, tag): value} of the TensorBoard event files in `folder`."""
    return {(e.step, v.tag): v.simple_value for name in os.listdir(folder)
            for e in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)) for v in e.summary.value}


# ------------------------------------------------ a task module + evaluation during training

@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, modules_dir):
    """4 steps of a task registered only by --gin.MIXTURE_OR_TASK_MODULE, evaluated every 2 steps."""
    write_task_module(modules_dir, "t5x_user_tasks_a", "t5x_user_task_a")
    assert "t5x_user_task_a" not in seqio.TaskRegistry.names()  # nothing but the macro registers it
    model_dir = str(tmp_path_factory.mktemp("evaluated"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(train_args(model_dir, "--gin.MIXTURE_OR_TASK_MODULE=t5x_user_tasks_a",
                                   "--gin.MIXTURE_OR_TASK_NAME=t5x_user_task_a", "--gin.EVAL_PERIOD=2",
                                   "--gin.EVAL_STEPS=2", "--gin.EVAL_MIXTURE_OR_TASK_NAME=t5x_user_task_a",
                                   "--gin.EVALUATOR_NUM_EXAMPLES=6"))
    return code, model_dir, out.getvalue()


def test_a_task_module_given_only_by_the_macro_trains(evaluated_run):
    code, model_dir, _ = evaluated_run
    assert code == 0
    assert [r["step"] for r in records(model_dir) if "loss" in r] == [1, 2, 3, 4]
    assert checkpoints.RunCheckpoints(model_dir).latest_step() == 4
    with open(os.path.join(model_dir, "config.gin")) as f:
        assert "MIXTURE_OR_TASK_MODULE = 't5x_user_tasks_a'" in f.read()


def test_eval_period_writes_validation_loss_and_inference_metrics(evaluated_run, modules_dir):
    from ul2lab.data import pipeline
    from ul2lab.models import decoding, network
    from ul2lab.models import loss as loss_lib
    from ul2lab.runs import train as train_run
    code, model_dir, printed = evaluated_run
    evals = [r for r in records(model_dir) if "loss" not in r]
    task = "t5x_user_task_a"
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert record[f"training_eval/{task}/loss"] > 0
        assert 0 <= record[f"training_eval/{task}/accuracy"] <= 1
        assert 0 <= record[f"inference_eval/{task}/exact_match"] <= 100
        assert record[f"inference_eval/{task}/mean_log_likelihood"] < 0
    # recomputed from the checkpoints of steps 2 and 4: the validation loss over the EVAL_STEPS = 2
    # batches of the validation split, and the metrics of the first EVALUATOR_NUM_EXAMPLES = 6 examples
    config = train_run.load_train_config(
        ["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin"],
        [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 4", f"MIXTURE_OR_TASK_NAME = '{task}'",
         f"TASK_FEATURE_LENGTHS = {LENGTHS}", "BATCH_SIZE = 8", "EVAL_STEPS = 2"])
    batches = pipeline.validation_batches(config)[task]()
    examples = list(seqio.get_mixture_or_task(task).get_dataset(
        LENGTHS, split="validation", shuffle=False, num_epochs=1).take(6).as_numpy_iterator())
    assert len(batches) == 2
    for step, record in zip((2, 4), evals):
        model, params, _ = checkpoints.load_params(model_dir, step)
        sums = [loss_lib.loss_fn(network.Transformer(model).apply(
                    {"params": params}, **{k: v for k, v in b.items() if k != "decoder_loss_weights"}), b,
                    z_loss=1e-4) for b in batches]
        tokens = sum(float(x["weights"]) for x in sums)
        assert record[f"training_eval/{task}/target_tokens"] == tokens
        assert record[f"training_eval/{task}/loss"] == pytest.approx(sum(float(x["loss"]) for x in sums) / tokens,
                                                                     rel=1e-4)
        assert record[f"training_eval/{task}/accuracy"] == pytest.approx(
            sum(float(x["correct"]) for x in sums) / tokens, rel=1e-4)
        inputs = np.stack([np.pad(e["inputs"], (0, 32 - len(e["inputs"]))) for e in examples])
        targets = np.stack([np.pad(e["targets"], (0, 16 - len(e["targets"]))) for e in examples])
        predicted = np.asarray(decoding.predict(params, model, inputs, 16)[0])
        until_eos = [list(p[:list(p).index(1) + 1]) if 1 in p else list(p) for p in predicted]
        exact = 100 * np.mean([u == list(e["targets"]) for u, e in zip(until_eos, examples)])
        assert record[f"inference_eval/{task}/exact_match"] == pytest.approx(exact)
        assert record[f"inference_eval/{task}/mean_log_likelihood"] == pytest.approx(
            float(np.mean(decoding.score(params, model, inputs, targets))), rel=1e-4)
    # TensorBoard as t5x lays it out
    train = scalars(os.path.join(model_dir, "train"))
    training_eval = scalars(os.path.join(model_dir, "training_eval", task))
    inference_eval = scalars(os.path.join(model_dir, "inference_eval", task))
    assert {s for s, tag in train if tag == "loss"} == {1, 2, 3, 4}
    # t5x's training scalar names (models.compute_base_metrics, the trainer's learning_rate) and their values
    assert {"loss", "accuracy", "cross_ent_loss", "z_loss", "learning_rate", "nonpadding_fraction",
            "timing/steps_per_second", "timing/seqs_per_second",
            "timing/target_tokens_per_second"} <= {tag for _, tag in train}
    for r in (r for r in records(model_dir) if "loss" in r):
        assert train[(r["step"], "cross_ent_loss")] == pytest.approx(r["loss"] - r["z_loss"], rel=1e-5)
        assert train[(r["step"], "nonpadding_fraction")] == pytest.approx(r["target_tokens"] / (8 * 16))
        assert 0 < r["nonpadding_fraction"] <= 1
        if r["step"] > 1:  # the first step compiles: timing starts after it
            per_step = r["timing/steps_per_second"]
            assert r["timing/seqs_per_second"] == pytest.approx(8 * per_step)
            assert r["timing/target_tokens_per_second"] == pytest.approx(8 * 16 * per_step)
    assert {"loss", "cross_ent_loss", "accuracy"} <= {tag for _, tag in training_eval}
    for step, record in zip((2, 4), evals):
        assert training_eval[(step, "loss")] == pytest.approx(record[f"training_eval/{task}/loss"])
        assert inference_eval[(step, "eval/exact_match")] == pytest.approx(record[f"inference_eval/{task}/exact_match"])
    # seqio's JSONLogger, as in t5x: the metrics and EVALUATOR_NUM_EXAMPLES = 6 predictions per evaluation
    with open(os.path.join(model_dir, "inference_eval", f"{task}-metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    with open(os.path.join(model_dir, "inference_eval", f"{task}-000004.jsonl")) as f:
        assert len(f.readlines()) == 6
    # the progress line says when evaluation runs
    assert f"step 2/4 | eval: validation loss of {task}; inference metrics of {task} ..." in printed
    assert "step 4/4 | eval done in" in printed and f"training_eval/{task}: " in printed


def test_a_module_that_does_not_import_is_one_line_naming_it(tmp_path, capsys):
    model_dir = tmp_path / "run"
    assert cli.main(train_args(model_dir, "--gin.MIXTURE_OR_TASK_MODULE=['t5x_no_such_tasks']",
                               "--gin.MIXTURE_OR_TASK_NAME=x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task module 't5x_no_such_tasks' (MIXTURE_OR_TASK_MODULE) could not be imported" in err[0]
    assert not model_dir.exists()
    assert cli.main(train_args(model_dir, "--mixture_or_task_module=t5x_no_such_flag_tasks",
                               "--gin.MIXTURE_OR_TASK_NAME=x")) == 2
    assert "task module 't5x_no_such_flag_tasks'" in capsys.readouterr().err


def test_the_module_flag_imports_before_the_gin_files_and_joins_the_macro(modules_dir):
    from ul2lab.runs import train as train_run
    write_task_module(modules_dir, "t5x_user_tasks_flag", "t5x_user_task_flag")
    config = train_run.load_train_config(
        ["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin"],
        ["MODEL_DIR = '/unused'", "TRAIN_STEPS = 4", "MIXTURE_OR_TASK_NAME = 't5x_user_task_flag'",
         "MIXTURE_OR_TASK_MODULE = 'json'"], mixture_or_task_modules=["t5x_user_tasks_flag"])
    assert "t5x_user_task_flag" in seqio.TaskRegistry.names()
    assert config.mixture_or_task_module == ["json", "t5x_user_tasks_flag"]


# --------------------------------------------------------------- t5x's macros, one by one

def load(*bindings):
    from ul2lab.runs import train as train_run
    return train_run.load_train_config(
        ["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin"],
        ["MODEL_DIR = '/unused'", "TRAIN_STEPS = 4", "MIXTURE_OR_TASK_NAME = 'x'", *bindings])


@pytest.mark.parametrize("binding, field, value", [
    ("DROPOUT_RATE = 0.25", "model.dropout_rate", 0.25),
    ("RANDOM_SEED = 7", "seed", 7),
    ("SHUFFLE_TRAIN_EXAMPLES = False", "shuffle_train_examples", False),
    ("USE_CACHED_TASKS = True", "use_cached_tasks", True),
    ("TRAIN_STEPS_RELATIVE = 100", "train_steps_relative", 100),
    ("MIXTURE_OR_TASK_MODULE = ['a.tasks', 'b.tasks']", "mixture_or_task_module", ["a.tasks", "b.tasks"]),
    ("EVAL_PERIOD = 50", "eval_period", 50),
    ("EVAL_STEPS = 3", "eval_steps", 3),
    ("EVAL_MIXTURE_OR_TASK_NAME = 'table_eval'", "eval_mixture_or_task_name", "table_eval"),
    ("EVALUATOR_NUM_EXAMPLES = 9", "evaluator_num_examples", 9),
    ("Z_LOSS = 0.0", "z_loss", 0.0),
    ("LABEL_SMOOTHING = 0.1", "label_smoothing", 0.1),
    ("LOSS_NORMALIZING_FACTOR = 233472", "loss_normalizing_factor", 233472),
])
def test_each_macro_sets_its_setting(binding, field, value):
    default, config = load(), load(binding)
    get = lambda c: getattr(c.model, field[6:]) if field.startswith("model.") else getattr(c, field)  # noqa: E731
    assert get(config) == value and get(default) != value


def test_dropout_rate_drops_out():
    import jax.numpy as jnp
    from ul2lab.models import network
    from test_train_step import packed_batch

    batch = {k: jnp.asarray(v) for k, v in packed_batch(0).items()}
    for rate in (0.0, 0.5):
        model = network.Transformer(load(f"DROPOUT_RATE = {rate}").model)
        params = network.init_params(model.config, jax.random.PRNGKey(0))

        def logits(key):
            return model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                               batch["decoder_target_tokens"], enable_dropout=True, rngs={"dropout": key})
        same = np.allclose(logits(jax.random.PRNGKey(1)), logits(jax.random.PRNGKey(2)))
        assert same == (rate == 0.0)


def test_random_seed_sets_the_initial_parameters_and_none_draws_one_kept_for_resuming(evaluated_run, tmp_path):
    from ul2lab.runs import train as train_run
    from ul2lab.train import step as step_lib, optimizers

    def first_param(seed):
        config = load(f"RANDOM_SEED = {seed}")
        state = step_lib.init_state(config.model, optimizers.make_optimizer("adafactor", 0.01), config.seed)
        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
    assert np.array_equal(first_param(3), first_param(3)) and not np.array_equal(first_param(3), first_param(4))
    unseeded = load("RANDOM_SEED = None")
    assert unseeded.seed is None
    fresh = train_run.resolve_seed(dataclasses.replace(unseeded, model_dir=str(tmp_path)))
    assert isinstance(fresh.seed, int)
    _, model_dir, _ = evaluated_run  # its checkpoints recorded seed 0: a resumed run keeps it
    assert train_run.resolve_seed(dataclasses.replace(unseeded, model_dir=model_dir)).seed == 0


def test_shuffle_train_examples(modules_dir):
    from ul2lab.data import pipeline
    write_task_module(modules_dir, "t5x_user_tasks_shuffle", "t5x_user_task_shuffle")
    import t5x_user_tasks_shuffle  # noqa: F401

    def first_inputs(shuffle):
        config = load("MIXTURE_OR_TASK_NAME = 't5x_user_task_shuffle'", f"SHUFFLE_TRAIN_EXAMPLES = {shuffle}",
                      f"TASK_FEATURE_LENGTHS = {LENGTHS}", "BATCH_SIZE = 4", "TrainConfig.pack = False")
        return next(pipeline.train_batches(config)(0))["encoder_input_tokens"]
    source = [ex["inputs"] for ex in seqio.get_mixture_or_task("t5x_user_task_shuffle").source.get_dataset(
        split="train", shuffle=False).take(4).as_numpy_iterator()]
    in_order = first_inputs(False)
    assert [list(row[:len(x)]) for row, x in zip(in_order, source)] == [list(x) for x in source]
    assert not np.array_equal(first_inputs(True), in_order)


def test_use_cached_tasks_reads_the_cache_or_says_how_to_build_it(modules_dir, tmp_path, capsys):
    write_task_module(modules_dir, "t5x_user_tasks_cacheable", "t5x_user_task_cacheable", cacheable=True)
    model_dir = tmp_path / "run"
    args = train_args(model_dir, "--gin.MIXTURE_OR_TASK_MODULE=t5x_user_tasks_cacheable",
                      "--gin.MIXTURE_OR_TASK_NAME=t5x_user_task_cacheable", "--gin.EVAL_PERIOD=None", steps=1)
    assert cli.main(args + ["--gin.USE_CACHED_TASKS=True"]) == 2
    err = capsys.readouterr().err
    assert "USE_CACHED_TASKS is True but task 't5x_user_task_cacheable' is not cached" in err
    assert "ul2lab cache --mixture_or_task t5x_user_task_cacheable" in err and not model_dir.exists()
    assert cli.main(args + ["--gin.USE_CACHED_TASKS=False"]) == 0


# ------------------------------------------------------------ t5x's step semantics

def test_a_t5x_style_continued_run_stops_at_the_absolute_step(evaluated_run, tmp_path, capsys):
    _, pretrained, _ = evaluated_run  # a run at step 4
    common = ["--gin.MIXTURE_OR_TASK_MODULE=t5x_user_tasks_a", "--gin.MIXTURE_OR_TASK_NAME=t5x_user_task_a",
              f"--gin.INITIAL_CHECKPOINT_PATH={pretrained}", "--gin.EVAL_PERIOD=None",
              "--gin.TrainConfig.learning_rate=@rsqrt_schedule()", "--gin.rsqrt_schedule.warmup_steps=1"]
    absolute = str(tmp_path / "absolute")
    assert cli.main(train_args(absolute, *common, steps=6)) == 0
    logged = [r for r in records(absolute) if "loss" in r]
    assert [r["step"] for r in logged] == [5, 6]  # the step continued from 4; TRAIN_STEPS=6 is where it stops
    assert logged[0]["learning_rate"] == pytest.approx(4 ** -0.5)  # the schedule at step 4, not 0
    assert checkpoints.RunCheckpoints(absolute).latest_step() == 6
    relative = str(tmp_path / "relative")
    assert cli.main(train_args(relative, *common, "--gin.TRAIN_STEPS_RELATIVE=2", steps=1)) == 0
    assert [r["step"] for r in records(relative) if "loss" in r] == [5, 6]
    # a rerun of a finished relative run keeps its end: nothing more to train
    assert cli.main(train_args(relative, *common, "--gin.TRAIN_STEPS_RELATIVE=2", steps=1)) == 0
    assert checkpoints.RunCheckpoints(relative).latest_step() == 6
    capsys.readouterr()
    assert cli.main(train_args(str(tmp_path / "short"), *common, steps=3)) == 2
    err = capsys.readouterr().err
    assert "TRAIN_STEPS 3 is not beyond step 4 of INITIAL_CHECKPOINT_PATH" in err
    assert "set TRAIN_STEPS=7 for 3 more steps, or TRAIN_STEPS_RELATIVE=3" in err
    assert not (tmp_path / "short").exists()


def test_infinite_schedule_start_step_rewarms_a_continued_step():
    rewarm = schedules.infinite_schedule(1e-2, 10, 10, 1e-3, start_step=-1000)
    assert float(rewarm(1000)) == 0.0 and rewarm.phase(1005) == "warmup"
    assert float(rewarm(1020)) == pytest.approx(1e-3)
    assert schedules.infinite_schedule(1e-2, 10, 10, 1e-3).in_constant_phase(1000)  # continued: no re-warm


# ------------------------------------------------------------------ t5x's names

@pytest.mark.parametrize("binding, ours", [
    ("--gin.utils.SaveCheckpointConfig.period=2000", "TrainConfig.checkpoint_period"),
    ("--gin.train/utils.DatasetConfig.batch_size=64", "BATCH_SIZE"),
    ("--gin.partitioning.PjitPartitioner.num_partitions=8", "TrainConfig.mesh_shape"),
    ("--gin.utils.create_learning_rate_scheduler.base_learning_rate=0.5", "rsqrt_schedule.base_learning_rate"),
    ("--gin.network.T5Config.emb_dim=512", "preset.emb_dim"),
    ("--gin.train_script.train.eval_period=500", "EVAL_PERIOD"),
    ("--gin.trainer.Trainer.num_microbatches=4", "TrainConfig.num_microbatches"),
    ("--gin.partitioning.ModelBasedPjitPartitioner.num_partitions=2", "TrainConfig.mesh_shape"),
    ("--gin.trainer.Trainer.weight_metrics_computer=@trainer.WeightMetricsComputer()",
     "no equivalent: grad_norm is logged"),
    ("--gin.utils.RestoreCheckpointConfig.path=/ckpt", "INITIAL_CHECKPOINT_PATH"),
    ("--gin.USE_HARDWARE_RNG=True", "no equivalent: JAX's default RNG is used"),
])
def test_each_t5x_configurable_gets_a_one_line_hint(tmp_path, capsys, binding, ours):
    model_dir = tmp_path / "run"
    assert cli.main(train_args(model_dir, "--gin.MIXTURE_OR_TASK_NAME=x", binding)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = binding[len("--gin."):].split("=")[0]
    assert err == [f"ul2lab train: error: gin: --gin.{name} is t5x's; in ul2lab: {err[0].split('in ul2lab: ')[1]}"]
    assert err[0].split("in ul2lab: ")[1].startswith(ours)
    assert not model_dir.exists()


# a t5x experiment file, as t5x's examples write them
T5X_GIN_FILE = """\
from __gin__ import dynamic_registration

import __main__ as train_script
from t5x import utils

include 't5x/examples/t5/t5_1_1/small.gin'
include 't5x/configs/runs/pretrain.gin'

MIXTURE_OR_TASK_NAME = "c4_v220_span_corruption"
TRAIN_STEPS = 10000
DROPOUT_RATE = 0.0

train_script.train:
  eval_period = 500
  use_hardware_rng = True

utils.SaveCheckpointConfig.period = 2000
"""


def test_including_a_t5x_gin_file_names_its_lines_without_equivalent(tmp_path, capsys):
    (tmp_path / "t5x_experiment.gin").write_text(T5X_GIN_FILE)
    (tmp_path / "mine.gin").write_text("include 'runs/pretrain_ul2.gin'\ninclude 't5x_experiment.gin'\n")
    assert cli.main(["train", f"--gin_search_paths={tmp_path}", "--gin_file=models/t5_1_1_tiny.gin",
                     "--gin_file=mine.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    message = err[0]
    assert f"gin file {tmp_path / 't5x_experiment.gin'} is written for t5x" in message
    no_equivalent, write_instead = message.split("write instead: ")
    for line in ("line 1 `from __gin__ import dynamic_registration`", "line 3 `import __main__ as train_script`",
                 "line 4 `from t5x import utils`", "line 15 `use_hardware_rng = True`"):
        assert line in no_equivalent
    for line in ("line 6 `include 't5x/examples/t5/t5_1_1/small.gin'` -> include 'models/t5_1_1_small.gin'",
                 "line 7 `include 't5x/configs/runs/pretrain.gin'` -> include 'runs/pretrain.gin'",
                 "line 14 `eval_period = 500` -> EVAL_PERIOD",
                 "line 17 `utils.SaveCheckpointConfig.period = 2000` -> TrainConfig.checkpoint_period"):
        assert line in write_instead
    for ours in ("line 9 ", "line 10 ", "line 11 "):  # t5x's macros are ours too
        assert ours not in message
    assert not (tmp_path / "run").exists()


# --------------------------------------------------- a command line of t5x's README

def test_a_t5x_readme_pretrain_command_with_our_gin_paths_runs(modules_dir, tmp_path, monkeypatch):
    """t5x's README: python3 t5x/train.py --gin_search_paths=${PROJECT_DIR} --gin_file=... \\
    --gin.MODEL_DIR=\\"${MODEL_DIR}\\" --tfds_data_dir=${TFDS_DATA_DIR} (--alsologtostderr in its
    pretraining guide); the experiment file is t5x's small_c4_pretrain.gin with our gin paths."""
    from absl import logging as absl_logging
    monkeypatch.setattr(seqio.utils, "_TFDS_DATA_DIR_OVERRIDE", seqio.utils._TFDS_DATA_DIR_OVERRIDE)
    verbosity = absl_logging.get_verbosity()
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    write_task_module(modules_dir, "t5x_readme_tasks", "t5x_readme_task")
    (project_dir / "tiny_pretrain.gin").write_text(textwrap.dedent("""\
        include 'models/t5_1_1_tiny.gin'
        include 'runs/pretrain.gin'

        # Register necessary SeqIO Tasks/Mixtures.
        import t5x_readme_tasks

        MIXTURE_OR_TASK_NAME = "t5x_readme_task"
        TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 16}
        TRAIN_STEPS = 3
        DROPOUT_RATE = 0.0
        BATCH_SIZE = 8
        """))
    model_dir, tfds_data_dir = tmp_path / "model", tmp_path / "tfds"
    try:
        assert cli.main(["train", f"--gin_search_paths={project_dir}", "--gin_file=tiny_pretrain.gin",
                         f'--gin.MODEL_DIR="{model_dir}"', f"--tfds_data_dir={tfds_data_dir}",
                         "--alsologtostderr"]) == 0
        assert seqio.utils._TFDS_DATA_DIR_OVERRIDE == str(tfds_data_dir)
        assert absl_logging.get_verbosity() == absl_logging.INFO
    finally:
        absl_logging.set_verbosity(verbosity)
    assert checkpoints.RunCheckpoints(str(model_dir)).latest_step() == 3
    logged = records(model_dir)
    assert [r["step"] for r in logged if "loss" in r] == [3]  # pretrain.gin's log period: the last step
    assert [r["step"] for r in logged if "training_eval/t5x_readme_task/loss" in r] == [3]  # t5x: eval at the end


# ------------------------------------------------------------ infer on a seqio task

def test_infer_a_task_split_into_infer_output_dir(evaluated_run, tmp_path, capsys):
    from ul2lab.models import decoding
    _, model_dir, _ = evaluated_run
    task = "t5x_user_task_a"
    out = tmp_path / "infer"
    common = ["--max_decode_length", "8", "--batch_size", "4", "--mixture_or_task_module", "t5x_user_tasks_a"]
    assert cli.main(["infer", "--checkpoint_dir", model_dir, "--mixture_or_task", task, "--split", "validation",
                     "--infer_output_dir", str(out), *common]) == 0
    with open(out / f"{task}-predict.jsonl-00000-of-00001") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 16 and all(set(line) == {"inputs", "prediction", "score"} for line in lines)
    # the first line is the model's greedy decoding of the split's first example
    config, params, _ = checkpoints.load_params(model_dir)
    example = next(seqio.get_mixture_or_task(task).get_dataset(
        {"inputs": 512, "targets": 8}, split="validation", shuffle=False).as_numpy_iterator())
    tokens, _ = decoding.predict(params, config, example["inputs"][None], 8)
    tokens = [int(t) for t in np.asarray(tokens)[0]]
    tokens = tokens[:tokens.index(1)] if 1 in tokens else tokens  # up to EOS, without padding
    assert lines[0]["prediction"] == [t for t in tokens if t != 0]
    assert lines[0]["inputs"] == {"inputs": [int(t) for t in example["inputs"][:-1]]}
    # the same through gin/runs/infer.gin, t5x's macros; score mode scores the targets
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH={model_dir}",
                     f"--gin.MIXTURE_OR_TASK_NAME={task}", "--gin.SPLIT='validation'",
                     f"--gin.INFER_OUTPUT_DIR={tmp_path / 'gin'}", "--gin.MODE='score'",
                     "--gin.MAX_DECODE_LENGTH=8", "--gin.BATCH_SIZE=4", "--gin.MIXTURE_OR_TASK_MODULE='t5x_user_tasks_a'"]) == 0
    with open(tmp_path / "gin" / f"{task}-score.jsonl-00000-of-00001") as f:
        scored = [json.loads(line) for line in f]
    want = decoding.score(params, config, example["inputs"][None], example["targets"][None])
    assert scored[0]["score"] == pytest.approx(float(np.asarray(want)[0]), rel=1e-4)
    capsys.readouterr()
    assert cli.main(["infer", "--checkpoint_dir", model_dir, "--mixture_or_task", task, "--split", "test",
                     "--infer_output_dir", str(out), *common]) == 2
    assert "--split 'test': 't5x_user_task_a' has no task with that split; its splits: train, validation" \
        in capsys.readouterr().err
    assert cli.main(["infer", "--checkpoint_dir", model_dir, "--mixture_or_task", task, *common]) == 2
    assert "--infer_output_dir (InferConfig.infer_output_dir, gin INFER_OUTPUT_DIR) required" in capsys.readouterr().err
