"""What a new user hit (issue #24), through the `ul2lab` command as typed: each case is refused with
one line naming the input and the fix, with nothing written, or now works.

The runs are test_train_cli's (its in-memory copy task, tiny model, infinite schedule)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from test_hostile_inputs import tiny_checkpoint
from test_train_cli import TASK, logged, train_args
from ul2lab.cli import main as cli
from ul2lab.train import checkpoints

TESTS = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def constant_phase_run(tmp_path_factory):
    """4 steps (warmup 2, cooldown 2): step 4, saved, is the first of the constant phase."""
    model_dir = str(tmp_path_factory.mktemp("main") / "run")
    assert cli.main(train_args(model_dir, steps=4)) == 0
    return model_dir


def one_line_error(capsys, command="train") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ul2lab {command}: error: ") and "\n" not in err, err
    return err


# ---- settings refused at the checks ------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1"])
def test_keep_checkpoints_below_one_is_refused_before_any_work(tmp_path, capsys, value):
    """0 used to delete every step as it was written (exit 0, a checkpoint path that does not exist);
    -1 was an orbax traceback."""
    model_dir = str(tmp_path / "run")
    assert cli.main(train_args(model_dir, f"--gin.TrainConfig.keep_checkpoints={value}")) == 2
    err = one_line_error(capsys)
    assert f"TrainConfig.keep_checkpoints = {value} cannot work" in err and "None keeps every checkpoint" in err
    assert not os.path.exists(model_dir)


def test_an_unknown_optimizer_name_is_one_line_naming_the_binding(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    assert cli.main(train_args(model_dir, "--gin.make_optimizer.name=adamx")) == 2
    err = one_line_error(capsys)
    assert "unknown optimizer 'adamx'; choose one of ['adafactor', 'adamw']" in err
    assert "make_optimizer.name" in err
    assert not os.path.exists(model_dir)


# ---- MODEL_DIR / --output_dir paths tensorstore cannot use -------------------------------------

BACKSLASH_DIR = "runs\\new"                # tensorstore reads the backslash as a separator
QUOTED_DIR = '\\"/tmp/ul2lab_quoted\\"'    # --gin.MODEL_DIR=\"/x\" typed inside single quotes


@pytest.mark.parametrize("model_dir", [BACKSLASH_DIR, QUOTED_DIR], ids=["backslash", "quoted_twice"])
def test_a_model_dir_tensorstore_cannot_use_is_refused_before_step_1(tmp_path, capsys, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    assert cli.main(train_args(model_dir)) == 2
    err = one_line_error(capsys)
    assert "cannot hold checkpoints: it contains a backslash" in err
    assert os.listdir(tmp_path) == [] and not os.path.exists("/tmp/ul2lab_quoted")


def test_import_and_anneal_output_dirs_are_checked_the_same_way(tmp_path, capsys, monkeypatch, constant_phase_run):
    monkeypatch.chdir(tmp_path)
    for command in (["import-hf", "--hf_dir", str(tmp_path / "hf")],
                    ["import-t5x", "--checkpoint_dir", str(tmp_path / "t5x")],
                    ["anneal", f"--checkpoint_dir={constant_phase_run}", "--anneal_steps=2", "--end_value=0.0"]):
        assert cli.main(command + ["--output_dir", "out\\put"]) == 2
        err = one_line_error(capsys, command[0])
        assert "--output_dir 'out\\\\put' cannot hold checkpoints: it contains a backslash" in err, err
        assert os.listdir(tmp_path) == []


# ---- a step that does not fit the model, in infer and eval -------------------------------------

def edited_checkpoint(tmp_path, request):
    """A checkpoint whose config.json was edited after the step was written (mlp_dim 128 -> 64)."""
    path = tiny_checkpoint(tmp_path, request)
    config = json.loads((path / "config.json").read_text())
    config["model"]["mlp_dim"] //= 2
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_infer_and_eval_of_a_step_that_does_not_fit_the_model_are_one_line(tmp_path, capsys, request):
    checkpoint = edited_checkpoint(tmp_path, request)
    (tmp_path / "in.jsonl").write_text('{"inputs": "a short line"}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["infer", "--checkpoint_dir", checkpoint, "--input_file", str(tmp_path / "in.jsonl"),
                     "--output_file", str(out), "--max_decode_length", "4"]) == 2
    err = one_line_error(capsys, "infer")
    assert f"the parameters in {checkpoint} (step 0) do not fit this model" in err
    assert "mlp/wi_0/kernel: (64, 128) saved, (64, 64) expected" in err
    assert not out.exists()
    assert cli.main(["eval", "--checkpoint_dir", checkpoint, "--mixture_or_task", TASK,
                     "--eval_output_dir", str(tmp_path / "eval")]) == 2
    assert "do not fit this model" in one_line_error(capsys, "eval")
    assert not (tmp_path / "eval").exists()


def test_infer_of_a_task_at_lengths_its_objective_cannot_use_is_one_line(tmp_path, capsys, request):
    import seqio
    import ul2lab_tasks.text as text_tasks
    checkpoint = str(tiny_checkpoint(tmp_path, request))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"words of line {i} " * 8}) + "\n"
                                              for i in range(8)))
    name = "user_paths_text_task"
    text_tasks.local_text_task(name, str(tmp_path / "d.jsonl"), vocabulary=request.getfixturevalue("tiny_vocabulary"),
                               denoisers="T5")
    try:
        assert cli.main(["infer", "--checkpoint_dir", checkpoint, "--mixture_or_task", name, "--split", "train",
                         "--infer_output_dir", str(tmp_path / "out"), "--feature_lengths", "inputs=128,targets=4"]) == 2
    finally:
        seqio.TaskRegistry.remove(name)
    err = one_line_error(capsys, "infer")
    assert "inputs=128,targets=4: the task's targets length 4 is too short at inputs length 128" in err
    assert "In call to configurable" not in err and not (tmp_path / "out").exists()


# ---- resume under a file-size limit ---------------------------------------------------------------

def test_a_resume_under_a_file_size_limit_is_one_line(constant_phase_run, tmp_path, capsys):
    """The data position is unpacked into temporary files; under `ulimit -f` that was an OSError traceback."""
    run = str(tmp_path / "run")
    shutil.copytree(constant_phase_run, run)
    before = {p: open(os.path.join(run, p), "rb").read() for p in ("config.gin", "config.json", "metrics.jsonl")}
    position = os.path.join(run, "4", "data", "host-0-of-1.bin")
    limit = os.path.getsize(position) // 4  # below the archive's largest member: extracting it fails
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    capsys.readouterr()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = cli.main(train_args(run, steps=8))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    err = one_line_error(capsys)
    assert "the data position saved after batch 4 cannot be unpacked" in err and "ulimit -f" in err
    assert {p: open(os.path.join(run, p), "rb").read() for p in before} == before
    assert checkpoints.all_steps(run) == [4]


# ---- ul2lab anneal as the README shows it ------------------------------------------------------

def test_anneal_without_its_length_names_the_flags_and_to_zero_works(constant_phase_run, tmp_path, capsys):
    branch = str(tmp_path / "annealed")
    # the README's command: the main run's gin sets no ANNEAL_STEPS / END_LEARNING_RATE
    assert cli.main(["anneal", "--checkpoint_dir", constant_phase_run, "--output_dir", branch]) == 2
    err = one_line_error(capsys, "anneal")
    assert "the anneal needs --anneal_steps and --end_value" in err and not os.path.exists(branch)
    # an anneal to a learning rate of 0 (used to be refused: end_value must be positive)
    assert cli.main(["anneal", "--checkpoint_dir", constant_phase_run, "--output_dir", branch,
                     "--anneal_steps", "2", "--end_value", "0.0"]) == 0
    records = logged(branch)
    assert [r["step"] for r in records] == [5, 6]
    # the learning rate of the step being taken: 0.02 at the constant, halfway to 0 after one of 2 steps
    assert [r["learning_rate"] for r in records] == pytest.approx([0.02, 0.01])
    assert checkpoints.all_steps(branch) == [4, 6]


# ---- one live run per MODEL_DIR ----------------------------------------------------------------

def start_training(model_dir):
    """`ul2lab train` in a child process, long enough to be alive while the test runs (killed by it)."""
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); import test_train_cli; "
            "from ul2lab.cli.main import main; sys.exit(main(sys.argv[1:]))")
    args = train_args(model_dir, "--gin.TrainConfig.checkpoint_period=1000000", steps=1000000)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def steps_logged(model_dir):
    path = os.path.join(model_dir, "metrics.jsonl")
    return len(logged(model_dir)) if os.path.exists(path) else 0


@pytest.mark.slow
def test_a_model_dir_in_use_by_a_live_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    child = start_training(model_dir)
    try:
        deadline = time.time() + 300
        while steps_logged(model_dir) < 1:  # the first run is past its checks and training
            assert child.poll() is None, child.stderr.read()
            assert time.time() < deadline, "the first run did not log a step"
            time.sleep(0.1)
        assert cli.main(train_args(model_dir, steps=2)) == 2
        err = one_line_error(capsys)
        assert f"MODEL_DIR {model_dir} is in use by another live run (pid {child.pid} on" in err
        logged_then = steps_logged(model_dir)
        while steps_logged(model_dir) <= logged_then:  # the first run goes on, unaffected
            assert child.poll() is None, child.stderr.read()
            assert time.time() < deadline, "the first run stopped logging"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(60)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    # kill -9 leaves no lock behind: the next run starts at once (from step 0: nothing was saved)
    assert cli.main(train_args(model_dir, steps=2)) == 0
    assert checkpoints.all_steps(model_dir) == [2]
