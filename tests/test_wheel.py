"""ul2lab as a user installs it: `pip install .` builds a wheel that holds the gin files (package ul2lab_gin,
from the repository's gin/) and the task modules (ul2lab_tasks, from tasks/), and `--gin_file=models/...` or
`--gin_file=gin/models/...` resolve from any folder, as t5x users expect of gin search paths."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from ul2lab.cli import main as cli
from ul2lab.models.config import PRESETS
from ul2lab.runs import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a gin file as the README names it: gin/runs/eval.gin, or models/t5_1_1_small.gin as a --gin_file
README_GIN = re.compile(r"(?<![\w/])(?:gin/)?((?:models|runs|schedules|partitioning)/\w+\.gin)\b")
TINY_RUN = ["MODEL_DIR = '/nonexistent/not-written'", "TRAIN_STEPS = 2"]


def build_env():
    """The environment without this checkout on PYTHONPATH (it would stand in for what the wheel installs)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """`pip wheel --no-deps .` of a copy of the checkout (a build/ left in the checkout could hold stale
    files); offline: the installed setuptools builds it (--no-build-isolation)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    for name in ("ul2lab", "tasks", "gin"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(source)], check=True, env=build_env(), cwd=str(dist),
                   stdout=subprocess.DEVNULL)
    (path,) = dist.glob("ul2lab-*.whl")
    return path


def test_the_wheel_holds_every_gin_file_and_task_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    with open(os.path.join(REPO, "README.md")) as f:
        named = set(README_GIN.findall(f.read()))
    assert len(named) >= 8, f"the README names gin files as gin/<folder>/<file>.gin: {sorted(named)}"
    shipped = {os.path.relpath(os.path.join(folder, f), os.path.join(REPO, "gin"))
               for folder, _, files in os.walk(os.path.join(REPO, "gin")) for f in files if f.endswith(".gin")}
    assert named <= shipped, f"the README names gin files the repository does not have: {sorted(named - shipped)}"
    missing = sorted(f for f in shipped if f"ul2lab_gin/{f}" not in names)
    assert not missing, f"the wheel lacks the gin files {missing}"
    assert {"ul2lab_tasks/__init__.py", "ul2lab_tasks/text.py", "ul2lab_tasks/tables.py"} <= names


@pytest.mark.parametrize("files", [
    ["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin"],           # as gin search paths: the shipped files
    ["gin/models/t5_1_1_tiny.gin", "gin/runs/pretrain_ul2.gin"],   # as the README types them at the root
])
def test_gin_files_resolve_from_an_unrelated_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = train.load_train_config(files, TINY_RUN)
    assert config.model.emb_dim == PRESETS["tiny"].emb_dim
    assert config.model.num_encoder_layers == PRESETS["tiny"].num_encoder_layers
    assert config.train_steps == 2


def test_a_gin_file_in_the_current_folder_comes_before_the_shipped_one(tmp_path, monkeypatch):
    """gin/models/t5_1_1_tiny.gin of the user's own folder is theirs, not ul2lab's."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "gin" / "models")
    (tmp_path / "gin" / "models" / "t5_1_1_tiny.gin").write_text(
        "MODEL = @ul2lab.models.config.preset()\npreset.name = 'tiny'\npreset.emb_dim = 96\n")
    config = train.load_train_config(["gin/models/t5_1_1_tiny.gin", "gin/runs/pretrain_ul2.gin"], TINY_RUN)
    assert config.model.emb_dim == 96


def test_a_gin_file_that_is_nowhere_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--gin_file=gin/models/t5_1_1_nano.gin", "--gin_file=runs/pretrain_ul2.gin",
                     "--gin.MODEL_DIR=run", "--gin.TRAIN_STEPS=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "gin/models/t5_1_1_nano.gin" in err and "not found" in err


TASK_MODULE = '''
import numpy as np
import seqio
import tensorflow as tf

def _examples(split, shuffle_files=False, seed=None):
    rng = np.random.default_rng(0)
    x = rng.integers(3, 512, (32, 12)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(x).map(lambda x: {"inputs": x, "targets": tf.reverse(x[:6], [0])})

vocabulary = seqio.PassThroughVocabulary(512, eos_id=1)
seqio.TaskRegistry.add("wheel_copy_task", seqio.FunctionDataSource(_examples, splits=["train"]),
                       preprocessors=[seqio.preprocessors.append_eos],
                       output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")})
'''


def wheel_venv(wheel, folder):
    """A fresh venv with the wheel installed --no-deps; the dependencies come from this interpreter's
    site-packages through a .pth line (which adds the folder but runs none of its .pth files, so the editable
    ul2lab installed there stays out, and the venv's own site-packages comes first)."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(purelib, "dependencies_of_the_test_interpreter.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    # --ignore-installed: the ul2lab this interpreter has (editable) is not the one to replace or keep
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, env=build_env(), stdout=subprocess.DEVNULL)
    return venv


@pytest.mark.slow
def test_the_installed_wheel_trains_from_an_unrelated_folder(wheel, tmp_path):
    """`ul2lab train --gin_file=models/t5_1_1_tiny.gin ...` of the installed wheel, 2 steps, in a folder that
    has nothing of the repository."""
    venv = wheel_venv(wheel, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "wheel_tasks.py").write_text(TASK_MODULE)
    env = dict(build_env(), PYTHONPATH=str(work), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import ul2lab, ul2lab_tasks; from ul2lab.runs import gin_config; "
         "print(ul2lab.__file__); print(ul2lab_tasks.__file__); print(gin_config.shipped_gin_dir())"],
        cwd=str(work), env=env, check=True, capture_output=True, text=True).stdout.split()
    assert len(where) == 3 and all(path.startswith(str(venv)) for path in where), where
    model_dir = work / "run"
    run = subprocess.run(
        [str(venv / "bin" / "ul2lab"), "train", "--gin_file=models/t5_1_1_tiny.gin",
         "--gin_file=gin/runs/pretrain_ul2.gin",
         f"--gin.MODEL_DIR={model_dir}", "--gin.MIXTURE_OR_TASK_MODULE=wheel_tasks",
         "--gin.MIXTURE_OR_TASK_NAME=wheel_copy_task", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
         "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None", "--gin.TrainConfig.log_period=1",
         "--gin.TrainConfig.num_devices=1", "--gin.TrainConfig.tensorboard=False"],
        cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(model_dir / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2]
