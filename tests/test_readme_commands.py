"""Every command in README.md's ```bash blocks is run by these tests, as typed, or is listed here with
the reason it cannot run on a CPU machine without downloads: a README command cannot fail as typed.

Each command (a line, continuations joined, comment lines left out, `&&` chains taken apart) must be
a key of COMMANDS, and every key must be in the README, so a new block fails here until it is
handled. What each kind means:
  PIP             `pip install ...`: not re-run; every extra it names is in setup.py, every -r file exists
  LAUNCH          a launcher dry run, run as typed from the repository root
  DEMO_CHAIN      run as typed, in README order, in one fresh directory (later commands read the demo's
                  ./ul2lab_demo), with the smoke settings appended (SMOKE); slow
  skip: REASON    not run (pods, GCS, downloads, /ckpt paths); a `ul2lab` one is still parsed by the
                  `ul2lab` command's own argument parser and every gin/... file it names must exist
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

PIP, LAUNCH, DEMO_CHAIN = "pip", "launch", "demo_chain"
NEEDS_BASE = "skip: a T5.1.1-base-or-larger run on C4 (a TFDS download) writing to /ckpt"
NEEDS_WIKITQ = "skip: table_eval reads WikiTQ and TabFact (downloads) and a /ckpt checkpoint"
NEEDS_HF = "skip: ./t5-v1_1-base is a Hugging Face download"
NEEDS_GCS = "skip: copies a released checkpoint from GCS (gsutil, a download)"
NEEDS_CKPT = "skip: reads a /ckpt or downloaded checkpoint that only the skipped commands before it make"
USERS_OWN = "skip: the user's own t5x project (my_pretrain.gin, ${PROJECT_DIR})"

# appended to a DEMO_CHAIN command (argparse: a flag given twice takes the last), so the chain runs in
# minutes: 4 steps, in the constant phase from step 2 so that `anneal` can branch off the last one, no
# validation loss at the end of the runs, 8 questions with short answers
SMOKE = {
    "ul2lab demo": "--train_steps 4 --gin.WARMUP_STEPS=1 --gin.COOLDOWN_STEPS=1 --gin.EVAL_PERIOD=None",
    "ul2lab eval": "--max_examples 8 --max_decode_length 8 --batch_size 8",
    "ul2lab anneal": "--anneal_steps 2 --gin.EVAL_PERIOD=None",
}

COMMANDS = {
    'pip install -e ".[hf]"': PIP,
    "ul2lab demo": DEMO_CHAIN,
    'pip install -e ".[test]"': PIP,
    "pip install --no-deps -r tests/requirements-beam.txt -r tests/requirements-peers.txt": PIP,
    "python -m pytest -q tests": "skip: the test suite itself, which holds this test",
    "ul2lab eval --checkpoint_dir ul2lab_demo --mixture_or_task embedded_tables_qa --max_decode_length 32":
        DEMO_CHAIN,
    "ul2lab anneal --checkpoint_dir ul2lab_demo --output_dir ul2lab_demo_annealed --anneal_steps 100 "
    "--end_value 1e-5": DEMO_CHAIN,
    "ul2lab eval --checkpoint_dir ul2lab_demo_annealed --mixture_or_task embedded_tables_qa "
    "--max_decode_length 32": DEMO_CHAIN,
    "ul2lab train --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/runs/pretrain_ul2.gin "
    "--gin_file=gin/partitioning/fsdp.gin --gin.MODEL_DIR=/ckpt/ul2_base --gin.TRAIN_STEPS=500000": NEEDS_BASE,
    "ul2lab eval --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH=/ckpt/tables "
    "--gin.MIXTURE_OR_TASK_NAME=table_eval --gin.EVAL_OUTPUT_DIR=/ckpt/tables/eval": NEEDS_WIKITQ,
    "ul2lab import-hf --hf_dir ./t5-v1_1-base --output_dir /ckpt/t5_base_init": NEEDS_HF,
    "ul2lab train --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/runs/continual_tables.gin "
    "--gin.MODEL_DIR=/ckpt/tables --gin.TRAIN_STEPS=100000 --gin.INITIAL_CHECKPOINT_PATH=/ckpt/t5_base_init":
        NEEDS_CKPT,
    "ul2lab train --gin_search_paths=${PROJECT_DIR} --gin_file=my_pretrain.gin "
    '--gin.MODEL_DIR=\\"${MODEL_DIR}\\" --tfds_data_dir=${TFDS_DATA_DIR} --alsologtostderr': USERS_OWN,
    "gsutil -m cp -r gs://scenic-bucket/ul2/ul220b/checkpoint_2650000 ./ul220b/": NEEDS_GCS,
    "ul2lab import-t5x --checkpoint_dir ./ul220b/checkpoint_2650000 --output_dir /ckpt/ul2_20b "
    "--model ul2_20b --vocab_path gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model": NEEDS_CKPT,
    "ul2lab train --gin_file=gin/models/ul2_20b.gin --gin_file=gin/runs/pretrain_ul2.gin "
    "--gin_file=gin/partitioning/fsdp.gin --gin.MODEL_DIR=/ckpt/ul2_20b_run "
    "--gin.TRAIN_STEPS=100000 --gin.INITIAL_CHECKPOINT_PATH=/ckpt/ul2_20b": NEEDS_CKPT,
    "ul2lab export-t5x --checkpoint_dir /ckpt/ul2_20b_run --output_dir ./ul2_20b_t5x": NEEDS_CKPT,
    "gsutil -m cp -r gs://t5-data/pretrained_models/t5.1.1.base ./t5.1.1.base": NEEDS_GCS,
    "ul2lab import-mtf --checkpoint_dir ./t5.1.1.base --output_dir /ckpt/t5_1_1_base --model t5_1_1_base "
    "--vocab_path gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model": NEEDS_CKPT,
    "gsutil -m cp -r gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000 ./t5_1_1_base_t5x/":
        NEEDS_GCS,
    "ul2lab import-t5x --checkpoint_dir ./t5_1_1_base_t5x/checkpoint_1000000 --output_dir /ckpt/t5_1_1_base "
    "--model t5_1_1_base --vocab_path gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model": NEEDS_CKPT,
    "ul2lab train --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/runs/continual_tables.gin "
    "--gin.MODEL_DIR=/ckpt/tables --gin.TRAIN_STEPS=100000 --gin.INITIAL_CHECKPOINT_PATH=/ckpt/t5_1_1_base":
        NEEDS_CKPT,
    "ul2lab export-t5x --checkpoint_dir /ckpt/tables --output_dir ./tables_t5x": NEEDS_CKPT,
    "ul2lab import-t5x --checkpoint_dir gs_copy/my_t5x_run --output_dir /ckpt/my_run --with_optimizer_state":
        "skip: the user's own t5x run, copied from GCS",
    "ul2lab train --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/runs/pretrain_ul2.gin "
    "--gin.MODEL_DIR=/ckpt/my_run --gin.TRAIN_STEPS=1200000": NEEDS_CKPT,
    "python launch/launch.py tpu --tpu_name my-pod --zone us-central2-b --workdir ~/ul2lab --dry_run -- "
    "--gin_file=gin/models/t5_1_1_large.gin --gin_file=gin/runs/pretrain_ul2.gin "
    "--gin_file=gin/partitioning/fsdp.gin --gin.MODEL_DIR=gs://bucket/run --gin.TRAIN_STEPS=100000": LAUNCH,
    "python launch/launch.py slurm --nodes 4 --gpus_per_node 8 --partition gpu --dry_run -- --gin_file=...":
        LAUNCH,
    "python launch/launch.py gke --name ul2 --image IMAGE --tpu_type v5p --tpu_topology 2x2x4 "
    "--num_hosts 4 --dry_run -- --gin_file=...": LAUNCH,
}


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def block_commands(block):
    """The commands of one block: comment lines out, backslash continuations joined, `&&` split."""
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    joined, logical = "", []
    for line in lines:
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1].strip() + " "
        else:
            logical.append((joined + line.strip()).strip())
            joined = ""
    assert not joined, f"a README block ends in a continuation: {block!r}"
    return [part.strip() for line in logical for part in line.split(" && ")]


def readme_commands():
    with open(README, encoding="utf-8") as f:
        return [c for block in bash_blocks(f.read()) for c in block_commands(block)]


def commands_of(kind):
    return [c for c in readme_commands() if COMMANDS.get(c) == kind]


def test_block_commands_parsing():
    block = "# a comment \\\n#   more\nul2lab a --x \\\n  --y=1\npip install -e . && ul2lab b\n"
    assert block_commands(block) == ["ul2lab a --x --y=1", "pip install -e .", "ul2lab b"]


def test_every_readme_command_is_handled_by_these_tests():
    commands = readme_commands()
    assert len(commands) >= 20, "README.md's ```bash blocks were not found"
    unlisted = [c for c in commands if c not in COMMANDS]
    assert not unlisted, ("README commands that tests/test_readme_commands.py neither runs nor skips with a "
                          f"reason; add each to COMMANDS: {unlisted}")
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS lists commands that are no longer in README.md: {stale}"
    for command, kind in COMMANDS.items():
        assert kind in (PIP, LAUNCH, DEMO_CHAIN) or kind.startswith("skip: "), (command, kind)


def setup_extras():
    """setup.py's extras_require keys, read from the file (setup() is not run)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    (extras,) = re.findall(r"extras_require=\{(.*?)\}", text, flags=re.S)
    return set(re.findall(r'"([\w-]+)":', extras))


def test_pip_install_commands_name_real_extras_and_files():
    commands = commands_of(PIP)
    assert commands
    extras = setup_extras()
    assert {"hf", "test"} <= extras
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["pip", "install"], command
        for arg in argv[2:]:
            match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if match:
                missing = set(match.group(1).split(",")) - extras
                assert not missing, f"{command!r} names extras setup.py does not have: {missing}"
        for i, arg in enumerate(argv):
            if arg == "-r":
                assert os.path.isfile(os.path.join(REPO, argv[i + 1])), f"{command!r}: no {argv[i + 1]}"


@pytest.mark.parametrize("command", [c for c, kind in COMMANDS.items() if kind == LAUNCH])
def test_launch_commands_run_as_typed(command):
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    assert "ul2lab train" in result.stdout and "--gin_file=" in result.stdout


@pytest.mark.parametrize("command", [c for c, kind in COMMANDS.items()
                                     if kind.startswith("skip: ") and c.startswith("ul2lab ")])
def test_skipped_ul2lab_commands_parse_and_name_real_gin_files(command):
    """What can be checked without running: `ul2lab`'s parser takes the flags, the gin files exist."""
    from ul2lab.cli import main
    argv = shlex.split(command)[1:]
    try:
        main.build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`ul2lab` refuses the README's {command!r} (exit {e.code})")
    for arg in argv:
        if arg.startswith("--gin_file=gin/"):
            assert os.path.isfile(os.path.join(REPO, arg.split("=", 1)[1])), f"{command!r}: no {arg}"


@pytest.mark.slow
def test_demo_and_the_commands_after_it_run_as_typed(tmp_path, ul2lab_cache_dir):
    """The demo and the eval / anneal of its output, in README order, in one directory, at smoke scale."""
    chain = commands_of(DEMO_CHAIN)
    assert chain[0] == "ul2lab demo" and len(chain) == len([k for k in COMMANDS.values() if k == DEMO_CHAIN])
    env = dict(os.environ, UL2LAB_CACHE_DIR=ul2lab_cache_dir)
    outputs = []
    for command in chain:
        smoke = SMOKE[" ".join(command.split()[:2])]
        result = subprocess.run(["bash", "-c", f"{command} {smoke}"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"`{command} {smoke}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert os.path.isdir(tmp_path / "ul2lab_demo" / "hf")
    evals = [out for command, out in zip(chain, outputs) if command.startswith("ul2lab eval")]
    assert evals
    for out in evals:
        assert re.search(r"^embedded_tables_qa/denotation_accuracy: [\d.]+$", out, re.M), out
        assert re.search(r"^embedded_tables_qa/answer_log_likelihood: -[\d.]+$", out, re.M), out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
