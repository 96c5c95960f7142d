"""`ul2lab train` / `ul2lab anneal` end to end on a small in-memory seqio task: the real data path
(seqio -> packing -> host batches), exact resume through it, and bad input refused before work."""
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2lab.cli import main as cli
from ul2lab.train import checkpoints

TASK = "train_cli_test_copy_task"
VOCAB_SIZE = 512


def _examples(split, shuffle_files=False, seed=None):
    """Learnable toy data: the targets are the inputs' first half reversed. Tensors, not a generator,
    so the pipeline's position is checkpointed (a resumed run restores it instead of replaying)."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(3, VOCAB_SIZE, int(rng.integers(6, 20))).astype(np.int32) for _ in range(64)]
    padded = np.zeros([len(inputs), 20], np.int32)
    for i, x in enumerate(inputs):
        padded[i, :len(x)] = x
    lengths = np.array([len(x) for x in inputs], np.int32)
    return tf.data.Dataset.from_tensor_slices((padded, lengths)).map(
        lambda x, n: {"inputs": x[:n], "targets": tf.reverse(x[:n // 2], [0])})


def _register():
    if TASK in seqio.TaskRegistry.names():
        return
    vocabulary = seqio.PassThroughVocabulary(VOCAB_SIZE, eos_id=1)
    seqio.TaskRegistry.add(
        TASK, seqio.FunctionDataSource(_examples, splits=["train"]),
        preprocessors=[seqio.preprocessors.append_eos],
        output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")})


_register()


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def train_args(model_dir, *extra, steps=8):
    return ["train", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain_ul2.gin",
            "--gin_file=schedules/infinite.gin",
            f"--gin.MODEL_DIR={model_dir}", f"--gin.MIXTURE_OR_TASK_NAME={TASK}",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", f"--gin.TRAIN_STEPS={steps}",
            "--gin.BATCH_SIZE=8", "--gin.TrainConfig.log_period=1", "--gin.TrainConfig.num_devices=1",
            "--gin.TrainConfig.learning_rate=@infinite_schedule()", "--gin.WARMUP_STEPS=2",
            "--gin.COOLDOWN_STEPS=2", "--gin.PEAK_LEARNING_RATE=0.05", "--gin.CONSTANT_LEARNING_RATE=0.02",
            "--gin.TrainConfig.checkpoint_period=4", *extra]


def logged(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("straight"))
    assert cli.main(train_args(model_dir)) == 0
    return model_dir


def test_the_data_check_probes_a_task_once_per_lengths_and_a_task_registered_anew_again(monkeypatch):
    from ul2lab.data import pipeline
    probed = []
    real = pipeline._yields_an_example  # noqa: SLF001
    monkeypatch.setattr(pipeline, "_yields_an_example", lambda task, *a: probed.append(task.name) or real(task, *a))
    lengths = {"inputs": 24, "targets": 12}  # lengths no other test probes
    pipeline.check_yields_examples(TASK, lengths)
    pipeline.check_yields_examples(TASK, lengths)
    assert probed == [TASK]
    pipeline.check_yields_examples(TASK, {"inputs": 24, "targets": 10})
    assert probed == [TASK, TASK]
    seqio.TaskRegistry.remove(TASK)
    _register()  # another task object under the name: its data may differ
    pipeline.check_yields_examples(TASK, lengths)
    assert probed == [TASK, TASK, TASK]


def test_train_writes_config_checkpoints_and_a_falling_loss(straight_run):
    records = logged(straight_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert records[0]["learning_rate"] == pytest.approx(0.0)       # warmup from 0
    assert records[4]["learning_rate"] == pytest.approx(0.02)      # constant phase from step 4
    with open(os.path.join(straight_run, "config.gin")) as f:
        operative = f.read()
    assert "TrainConfig.mixture_or_task_name = %MIXTURE_OR_TASK_NAME" in operative
    assert TASK in operative
    config, payload = checkpoints.read_config(straight_run)
    assert config.emb_dim == 64 and payload["task_feature_lengths"] == {"inputs": 32, "targets": 16}
    assert checkpoints.RunCheckpoints(straight_run).latest_step() == 8
    tensorboard_dir = os.path.join(straight_run, "train")  # t5x's layout
    events = [os.path.join(tensorboard_dir, f) for f in os.listdir(tensorboard_dir)]
    scalars = {(e.step, v.tag): v.simple_value
               for path in events for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value}
    assert scalars[(8, "loss")] == pytest.approx(records[-1]["loss"])


def test_resumed_run_through_seqio_reproduces_the_straight_run(straight_run, tmp_path, capsys):
    model_dir = str(tmp_path)
    assert cli.main(train_args(model_dir, steps=4)) == 0
    assert "host-0-of-1.bin" in os.listdir(os.path.join(model_dir, "4", "data"))  # this host's position
    capsys.readouterr()
    assert cli.main(train_args(model_dir, steps=8)) == 0  # resumes at 4 from the saved data position
    assert "restored the data position after batch 4 (nothing replayed)" in capsys.readouterr().out
    resumed = {r["step"]: r["loss"] for r in logged(model_dir)}
    straight = {r["step"]: r["loss"] for r in logged(straight_run)}
    assert resumed == straight


@pytest.mark.slow
def test_anneal_branches_into_a_new_directory_and_leaves_the_main_run_alone(straight_run, tmp_path, capsys):
    before = sorted(os.listdir(straight_run)), open(os.path.join(straight_run, "metrics.jsonl")).read()
    branch = str(tmp_path / "annealed")
    assert cli.main(["anneal", f"--checkpoint_dir={straight_run}", f"--output_dir={branch}", "--step=4",
                     "--anneal_steps=4", "--end_value=0.002"]) == 0
    records = logged(branch)
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    # the branch continues the main run's data after batch 4: the copied step holds the position
    assert "restored the data position after batch 4 (nothing replayed)" in capsys.readouterr().out
    expected = [0.02 * (0.1 ** ((s - 4) / 4)) for s in (4, 5, 6, 7)]  # lr of the step being taken
    np.testing.assert_allclose([r["learning_rate"] for r in records], expected, rtol=1e-5)
    assert checkpoints.RunCheckpoints(branch).latest_step() == 8
    assert (sorted(os.listdir(straight_run)), open(os.path.join(straight_run, "metrics.jsonl")).read()) == before


def test_continual_run_continues_an_infinite_schedule_and_re_warms_after_another(straight_run, tmp_path,
                                                                                 capsys):
    import dataclasses

    from ul2lab.runs import train as train_run
    # the straight run chose (and recorded) its start when it began: from step 0
    with open(os.path.join(straight_run, "config.gin")) as f:
        assert "\ninfinite_schedule.start_step = 0\n" in f.read()
    config = train_run.load_train_config(
        ["models/t5_1_1_tiny.gin", "runs/continual_tables.gin"],
        [f"MODEL_DIR = '{tmp_path / 'new'}'", "TRAIN_STEPS = 10", f"INITIAL_CHECKPOINT_PATH = '{straight_run}'"])
    assert config.learning_rate.start_step is None
    # from a run trained with the infinite schedule: the step continues from its step 8 (t5x), so the
    # schedule needs no shift (its own start_step, 0): no re-warm
    resolved, note = train_run.resolve_schedule(config)
    assert resolved.learning_rate.start_step == 0 and "infinite_schedule.start_step = 0" in note
    assert "no re-warm" in capsys.readouterr().out
    # from a checkpoint trained with another schedule (an import-hf output has no config.gin): re-warm
    imported = tmp_path / "imported"
    imported.mkdir()
    resolved, note = train_run.resolve_schedule(dataclasses.replace(config, initial_checkpoint_path=str(imported)))
    assert resolved.learning_rate.start_step == 0 and float(resolved.learning_rate(0)) == 0.0
    assert "re-warming" in capsys.readouterr().out
    # a start_step set in gin is the user's choice; a resumed run keeps what it recorded
    chosen = dataclasses.replace(config, learning_rate=dataclasses.replace(config.learning_rate, start_step=3))
    assert train_run.resolve_schedule(chosen) == (chosen, "")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.gin").write_text("infinite_schedule.start_step = 5\n")
    assert train_run.resolve_schedule(config)[0].learning_rate.start_step == 5


@pytest.mark.parametrize("extra, message", [
    (["--gin.TrainConfig.train_step=5"], "TrainConfig has no parameter 'train_step'; did you mean train_steps"),
    (["--gin.TrainConfg.batch_size=8"], "unknown name 'TrainConfg'; did you mean TrainConfig"),
    (["--gin.preset.emb_dimm=32"], "T5Config has no field 'emb_dimm'; did you mean emb_dim"),
    (["--gin.TRAIN_STEP=5"], "macro TRAIN_STEP is not used by any gin file; did you mean TRAIN_STEPS"),
    (["--gin.MIXTURE_OR_TASK_NAME=train_cli_test_copy_tsk"],
     f"'train_cli_test_copy_tsk' is not a registered seqio task or mixture; did you mean '{TASK}'?"),
    (["--gin.BATCH_SIZE=6", "--gin.TrainConfig.num_devices=8"],
     "BATCH_SIZE 6 (/1 microbatches = 6) is not divisible by the data-parallel size 8"),
    (["--num_processes=2"], "multi-host flags --num_processes need --coordinator_address, --process_id too"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     "--process_id must be in 0 ... 1 (--num_processes 2), got 2"),
])
def test_bad_input_fails_before_any_work(tmp_path, capsys, extra, message):
    model_dir = str(tmp_path / "run")
    assert cli.main(train_args(model_dir, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(model_dir)


def test_missing_model_dir_is_named(capsys):
    args = [a for a in train_args("unused") if not a.startswith("--gin.MODEL_DIR")]
    assert cli.main(args) == 2
    assert "required settings MODEL_DIR are not set; pass --gin.MODEL_DIR=..." in capsys.readouterr().err


def test_model_dir_of_another_model_is_refused_and_untouched(straight_run, capsys):
    before = {p: os.path.getmtime(os.path.join(straight_run, p)) for p in os.listdir(straight_run)}
    assert cli.main(train_args(straight_run, "--gin.preset.emb_dim=32")) == 2
    assert "holds a checkpoint of another model shape (emb_dim: 64 there, 32 now)" in capsys.readouterr().err
    assert {p: os.path.getmtime(os.path.join(straight_run, p)) for p in os.listdir(straight_run)} == before


def test_missing_model_file_is_named(tmp_path, capsys):
    args = [a for a in train_args(str(tmp_path / "run")) if "models/" not in a]
    assert cli.main(args) == 2
    assert "the macro MODEL is used but never set" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("run_file", ["runs/pretrain_ul2.gin", "runs/continual_tables.gin", "runs/finetune.gin",
                                      "runs/demo_continual_tables_cpu.gin"])
@pytest.mark.parametrize("model_file", ["models/t5_1_1_small.gin", "models/ul2_20b.gin"])
def test_every_run_file_builds_a_config_with_every_model(run_file, model_file):
    from ul2lab.runs import train as train_run
    from ul2lab.train import schedules
    from ul2lab.models.config import PRESETS

    config = train_run.load_train_config(
        [model_file, run_file, "partitioning/fsdp.gin"],
        ["MODEL_DIR = '/unused'", "TRAIN_STEPS = 10", "MIXTURE_OR_TASK_NAME = 'x'", "INITIAL_CHECKPOINT_PATH = '/ckpt'"])
    name = model_file.split("/")[-1][:-4] if "demo" not in run_file else "tiny"  # the demo includes its model
    assert config.model.emb_dim == PRESETS[name].emb_dim and config.model.num_heads == PRESETS[name].num_heads
    assert config.mesh_shape == {"data": 1, "fsdp": -1, "model": 1} and config.logical_axis_rules == "fsdp"
    if run_file == "runs/continual_tables.gin":  # continual: re-warms unless resolve_schedule continues
        schedule = config.learning_rate
        assert isinstance(schedule, schedules.InfiniteSchedule) and schedule.start_step is None
        assert float(schedule(0)) == 0.0 and float(schedule(schedule.warmup_steps)) == pytest.approx(
            schedule.peak_value)
        assert float(schedule(schedule.constant_start)) == pytest.approx(schedule.constant_value)
        assert config.initial_checkpoint_path == "/ckpt"
    if run_file == "runs/finetune.gin":
        assert config.model.dropout_rate == 0.1 and config.task_feature_lengths["targets"] == 114


def test_a_data_command_on_a_cpu_machine_prints_its_error_and_nothing_else(tmp_path):
    """The console script as a newcomer runs it, in a fresh process: TensorFlow's native start-up
    lines (absl's pre-init notice, "Could not find cuda drivers", "failed call to cuInit") used to
    precede every command's output; now a bad checkpoint path is one line on stderr."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    missing = str(tmp_path / "no_such_run")
    done = subprocess.run([sys.executable, "-c", "import sys; from ul2lab.cli.main import main; sys.exit(main())",
                           "eval", f"--checkpoint_dir={missing}", "--mixture_or_task", TASK],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ul2lab eval: error:") and missing in lines[0], done.stderr


def copy_of(run, tmp_path):
    import shutil
    shutil.copytree(run, tmp_path / "run")
    return str(tmp_path / "run")


def test_a_run_of_another_optimizer_is_refused_and_its_run_files_are_untouched(straight_run, tmp_path, capsys):
    """The checks that need the restore (the optimizer state's tree) used to fail after config.gin
    and config.json had been overwritten with the rejected settings."""
    run = copy_of(straight_run, tmp_path)
    before = {p: open(os.path.join(run, p), "rb").read() for p in ("config.gin", "config.json", "metrics.jsonl")}
    assert cli.main(train_args(run, "--gin.make_optimizer.name='adamw'", steps=12)) == 2
    assert "do not match this run's model and optimizer" in capsys.readouterr().err
    assert {p: open(os.path.join(run, p), "rb").read() for p in before} == before


def test_a_resume_with_another_batch_size_is_refused_unless_asked_for(straight_run, tmp_path, capsys):
    run = copy_of(straight_run, tmp_path)
    assert cli.main(train_args(run, "--gin.BATCH_SIZE=16", steps=12)) == 2
    assert "was trained with BATCH_SIZE 8 (step 8), this run has BATCH_SIZE 16" in capsys.readouterr().err
    assert checkpoints.all_steps(run)[-1] == 8


def test_anneal_of_a_corrupted_step_is_a_one_line_error_and_leaves_nothing(straight_run, tmp_path, capsys):
    from test_integrity import CORRUPT, corrupt_largest_params_file
    run = copy_of(straight_run, tmp_path)
    corrupt_largest_params_file(os.path.join(run, "8"))
    branch = str(tmp_path / "annealed")
    capsys.readouterr()
    assert cli.main(["anneal", f"--checkpoint_dir={run}", f"--output_dir={branch}", "--step=8",
                     "--anneal_steps=4", "--end_value=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"step 8 of {run} cannot be annealed" in err and CORRUPT.search(err), err
    assert "\n" not in err and not os.path.exists(branch)


def test_orphan_temporary_checkpoint_directories_are_cleaned_at_start(straight_run, tmp_path):
    run = copy_of(straight_run, tmp_path)
    os.makedirs(os.path.join(run, "12.orbax-checkpoint-tmp-1234"))  # what a kill during a save leaves
    assert cli.main(train_args(run, steps=12)) == 0
    assert not [d for d in os.listdir(run) if "orbax-checkpoint-tmp" in d]
    assert checkpoints.all_steps(run)[-1] == 12
