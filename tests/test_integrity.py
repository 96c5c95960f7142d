"""Checkpoint integrity: bytes damaged after a step was written (same size, nothing looks truncated)
are caught by the step's checksums in every command that reads a checkpoint: train (the step is set
aside and the previous one used), infer, eval and export-hf (a one-line error; anneal restores through train). Restored
arrays are checked finite, and a run that skips every step as non-finite exits non-zero."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_trainer import make_config, synthetic_batches
from ul2lab.cli import main as cli
from ul2lab.models.config import preset
from ul2lab.models.network import init_params
from ul2lab.train import checkpoints, integrity
from ul2lab.train import loop as trainer


# A damaged step reads either as arrays that differ from their checksums or, when the garbage lands on a
# compressed chunk or the OCDBT index, as files tensorstore cannot decode: both are "corrupt"
CORRUPT = re.compile(r"does not match the checksum saved with it|its files cannot be decoded")


def corrupt_largest_params_file(step_dir, at=0.5):
    """4 KiB of garbage at fraction `at` of the step's largest params file; its size stays the same."""
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "params")) for f in names]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, "r+b") as f:
        offset = int(size * at)
        # never past the end (at 0.99 of a file under 400 KiB, 4 KiB would grow it: the size varies by run)
        count = min(4096, size // 4, size - offset)
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())
    assert os.path.getsize(largest) == size
    return largest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_vocabulary):
    """A 6-step run with checkpoints at steps 3 and 6 and the tiny vocabulary recorded."""
    root = tmp_path_factory.mktemp("integrity")
    trainer.train(make_config(root / "run", async_checkpoints=False), synthetic_batches(),
                  vocab_path=tiny_vocabulary.sentencepiece_model_file)
    return root / "run"


def copy_run(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_the_digest_sees_any_change_and_is_the_same_sharded():
    x = jnp.arange(1000, dtype=jnp.float32).reshape(10, 100)
    base = integrity.digests({"x": x})["arrays"]
    y = x.at[3, 7].set(np.nextafter(np.float32(x[3, 7]), np.float32(1e9)))
    assert integrity.digests({"x": y})["arrays"] != base  # one ulp of one element
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert integrity.digests({"x": swapped})["arrays"] != base  # same words, other places
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)),
                                          jax.sharding.PartitionSpec("d"))
    assert integrity.digests({"x": jax.device_put(x, sharding)})["arrays"] == base
    assert integrity.problems({"x": x.at[2, 2].set(jnp.nan)}) == ["x holds NaN or inf"]


@pytest.mark.parametrize("command", ["infer_score", "export_hf", "eval"])
def test_read_only_commands_refuse_corrupted_bytes_in_one_line(trained_run, command, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    corrupt_largest_params_file(run / "6")
    (tmp_path / "in.jsonl").write_text(json.dumps({"inputs": "ka lo", "targets": "mi ne"}) + "\n")
    argv = {
        "infer_score": ["infer", "--checkpoint_dir", str(run), "--input_file", str(tmp_path / "in.jsonl"),
                        "--output_file", str(tmp_path / "out.jsonl"), "--mode", "score"],
        "export_hf": ["export-hf", "--checkpoint_dir", str(run), "--output_dir", str(tmp_path / "hf")],
        "eval": ["eval", "--checkpoint_dir", str(run), "--mixture_or_task", "synthetic_never_reached"],
    }[command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr().err
    assert "Traceback" not in captured, captured
    errors = [line for line in captured.splitlines() if line.startswith("ul2lab ")]  # not library log lines
    assert len(errors) == 1, captured
    err = errors[0]
    assert f"{run}/6 is corrupt" in err, err
    assert CORRUPT.search(err), err
    # nothing was written
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "hf" / "model.safetensors").exists()


def test_train_sets_a_corrupted_step_aside_and_resumes_from_the_previous_one(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    corrupt_largest_params_file(run / "6")
    result = trainer.train(make_config(run, train_steps=8, async_checkpoints=False), synthetic_batches())
    out = capsys.readouterr().out
    assert f"restoring step 6 of {run}" in out  # said before the (slow) restore starts
    assert CORRUPT.search(out) and "trying the previous one" in out
    assert result["history"][0]["step"] == 4  # resumed from step 3
    aside = [d for d in os.listdir(run) if d.startswith("corrupt-6-")]
    assert len(aside) == 1  # kept for inspection, not deleted
    assert checkpoints.all_steps(str(run))[-1] == 8
    checkpoints.load_params(str(run))  # the new steps verify


def test_nonfinite_params_are_refused_even_with_matching_checksums(tmp_path):
    config = preset("tiny")
    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(0))
    first = jax.tree_util.tree_leaves_with_path(params)[0][0]
    params = jax.tree_util.tree_map_with_path(lambda p, x: x.at[(0,) * x.ndim].set(jnp.inf) if p == first else x,
                                              params)
    checkpoints.save_params(str(tmp_path), params, config)
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"holds NaN or inf"):
        checkpoints.load_params(str(tmp_path))


def test_a_run_whose_every_step_is_skipped_as_nonfinite_stops_nonzero(tmp_path):
    config = make_config(tmp_path, train_steps=3, learning_rate=lambda step: jnp.float32(jnp.nan),
                         async_checkpoints=False)
    with pytest.raises(trainer.TrainingStopped, match=r"every step this run took \(3\) had a non-finite"):
        trainer.train(config, synthetic_batches())


@pytest.mark.parametrize("at", [0.1, 0.3, 0.5, 0.7, 0.95])
def test_damage_anywhere_in_the_params_files_is_called_corrupt(trained_run, tmp_path, at):
    """Wherever the bytes are damaged (array data, a compressed chunk, the index), loading says the
    step is corrupt, never "do not fit this model" (tensorstore's decode error was misread as that)."""
    run = copy_run(trained_run, tmp_path)
    corrupt_largest_params_file(run / "6", at=at)
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{run}/6 is corrupt: ") as caught:
        checkpoints.load_params(str(run), step=6)
    assert CORRUPT.search(str(caught.value)), caught.value


# damage offsets of the trained_run's largest params file whose garbage lands on compressed chunks or the
# OCDBT index, so tensorstore fails to decode it (a fixed seed makes the same files every run)
DECODE_FAILURES = (0.0, 0.2, 0.4, 0.99)


def test_a_step_that_cannot_be_decoded_prints_one_line_and_no_traceback(trained_run, tmp_path):
    """When one read of a restore fails to decode, orbax abandons the others: they end later, at exit or
    in the middle of a run, and each printed a traceback of its own (hundreds of lines after the one-line
    error, about every other time). A separate process, as a user runs it: stderr is the errors alone."""
    runs = []
    for at in DECODE_FAILURES:
        run = tmp_path / f"run{at}"
        shutil.copytree(trained_run, run)
        corrupt_largest_params_file(run / "6", at=at)
        runs.append(str(run))
    script = textwrap.dedent("""
        import sys
        from ul2lab.train import checkpoints
        for attempt in range(3):
            for run in sys.argv[1:]:
                try:
                    checkpoints.load_params(run, step=6)
                except checkpoints.CorruptCheckpointError as e:
                    print("refused:", str(e).splitlines()[0][:160], file=sys.stderr, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script, *runs], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("I0000", "E0000", "W0000"))]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    # what was dropped is counted, one line after the restore that abandoned it
    lines = [line for line in lines if not re.fullmatch(r"note: dropped \d+ reports? of reads that the failed "
                                                          r"checkpoint restore abandoned .*", line)]
    assert len(lines) == 3 * len(runs) and all(line.startswith("refused:") for line in lines), lines
    decoded = sum("its files cannot be decoded" in line for line in lines)
    assert decoded >= 3, f"the offsets {DECODE_FAILURES} no longer hit the decode path: {lines}"


def test_arrays_are_named_as_paths_of_plain_words():
    """The optimizer state's names read like the parameters' (it printed "opt_state'][0].count")."""
    names = ["['opt_state'][0].count", "['opt_state'][0].v_row['decoder/decoder_norm/scale']",
             "['params']['encoder']['layers_0']['mlp']['wo']['kernel']", "['a']", "['b']"]
    assert integrity.describe(names) == ("opt_state/0/count, opt_state/0/v_row/decoder/decoder_norm/scale, "
                                         "params/encoder/layers_0/mlp/wo/kernel and 2 more arrays")
