"""Where `ul2lab export-hf` / `export-t5x` write, as a user types them: never into the checkpoint they read,
never over unrelated files, one line for an output that is a file, the vocabulary through t5x and back,
and Ctrl-C: exit 130, one line, the output folder absent or whole.
"""
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr

import jax
import numpy as np
import pytest

from ul2lab.cli.main import main
from ul2lab.models.config import T5Config
from ul2lab.models.network import init_params
from ul2lab.train import checkpoints

CONFIG = T5Config(vocab_size=320, emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=1, head_dim=8,
                  mlp_dim=24, mlp_activations=("silu", "linear"), logits_via_embedding=False, dtype="float32")
PIECES = 200  # the SentencePiece model's own pieces; + 100 extra ids <= CONFIG.vocab_size
HF_FILES = {"config.json", "generation_config.json", "model.safetensors"}


def _train_sentencepiece(prefix):
    import sentencepiece as spm
    rng = np.random.RandomState(0)
    syllables = ["ka", "lo", "mi", "tre", "sun", "ba", "ro", "el", "qu", "zi", "pa", "nor", "the", "cat"]
    words = ["".join(rng.choice(syllables, rng.randint(1, 4))) for _ in range(300)]
    sentences = [" ".join(rng.choice(words, rng.randint(3, 12))) for _ in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=PIECES,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A ul2lab checkpoint (step 3) that records its vocabulary, as `ul2lab train` leaves one."""
    root = tmp_path_factory.mktemp("export_targets")
    vocab = _train_sentencepiece(root / "sp")
    params = jax.tree_util.tree_map(np.asarray, init_params(CONFIG, jax.random.PRNGKey(0)))
    checkpoints.save_params(str(root / "run"), params, CONFIG, step=3, vocab_path=vocab)
    return str(root / "run")


def _cli(argv):
    """(exit code, stderr) of `ul2lab argv`."""
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def _one_line(err):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- the checkpoint's own folder

@pytest.mark.parametrize("command", ["export-hf", "export-t5x"])
@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_the_checkpoint_directory_is_refused(run_dir, tmp_path, command, inside, overwrite):
    run_dir = shutil.copytree(run_dir, str(tmp_path / "run"))  # its own copy: on failure the export clobbers it
    before = _snapshot(run_dir)
    step = max(int(name) for name in os.listdir(run_dir) if name.isdigit())
    out = os.path.join(run_dir, str(step), "exported") if inside else run_dir  # inside: one of the run's steps
    code, err = _cli([command, "--checkpoint_dir", run_dir, "--output_dir", out] + ["--overwrite"] * overwrite)
    assert code == 2
    # the real reason and the fix, not "already holds a Hugging Face model; pass --overwrite"
    assert "inside" in _one_line(err) if inside else "checkpoint directory" in _one_line(err)
    assert "choose a folder outside it" in err, err
    assert _snapshot(run_dir) == before  # the run's config.json, steps and vocabulary are untouched
    checkpoints.load_params(run_dir)


def test_a_new_subfolder_of_the_run_takes_the_export_and_the_run_is_untouched(run_dir, tmp_path):
    """`ul2lab demo` exports to MODEL_DIR/hf: a folder of the export's own inside the run is not the run's."""
    run_dir = shutil.copytree(run_dir, str(tmp_path / "run"))
    before = _snapshot(run_dir)
    code, err = _cli(["export-hf", "--checkpoint_dir", run_dir, "--output_dir", os.path.join(run_dir, "hf")])
    assert code == 0, err
    assert os.path.isfile(os.path.join(run_dir, "hf", "config.json"))
    assert {k: v for k, v in _snapshot(run_dir).items() if not k.startswith("hf" + os.sep)} == before
    checkpoints.load_params(run_dir)


@pytest.mark.parametrize("command", ["export-hf", "export-t5x"])
def test_export_into_another_checkpoint_is_refused(run_dir, tmp_path, command):
    other = shutil.copytree(run_dir, str(tmp_path / "other_run"))
    before = _snapshot(other)
    code, err = _cli([command, "--checkpoint_dir", run_dir, "--output_dir", other, "--overwrite"])
    assert code == 2 and "holds a ul2lab checkpoint" in _one_line(err), err
    assert _snapshot(other) == before


# ----------------------------------------------------------------------------- one --overwrite rule

EXPORTS = {  # command: (what it writes, a file an older export of the same kind left that it no longer writes)
    "export-hf": (HF_FILES | {"spiece.model", "tokenizer.json", "tokenizer_config.json"},
                  "model-00001-of-00002.safetensors"),
    "export-t5x": ({"checkpoint_3", "config.gin", "sentencepiece.model"}, "checkpoint_9"),
}


@pytest.mark.parametrize("command", sorted(EXPORTS))
def test_overwrite_replaces_the_export_and_keeps_other_files(run_dir, tmp_path, command):
    written, stale = EXPORTS[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my eval notes")
    (out / "results").mkdir()
    (out / "results" / "bleu.json").write_text("{}")
    # unrelated files alone are no export: no --overwrite needed, and they stay
    assert _cli([command, "--checkpoint_dir", run_dir, "--output_dir", str(out)])[0] == 0
    assert set(os.listdir(out)) == written | {"notes.txt", "results"}
    (out / stale).mkdir() if command == "export-t5x" else (out / stale).write_text("old shard")

    code, err = _cli([command, "--checkpoint_dir", run_dir, "--output_dir", str(out)])
    assert code == 2 and "--overwrite" in _one_line(err)
    code, err = _cli([command, "--checkpoint_dir", run_dir, "--output_dir", str(out), "--overwrite"])
    assert code == 0, err
    assert set(os.listdir(out)) == written | {"notes.txt", "results"}  # the stale shard / step is gone
    assert (out / "notes.txt").read_text() == "my eval notes" and (out / "results" / "bleu.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no folder left beside it


@pytest.mark.parametrize("command", sorted(EXPORTS))
def test_output_dir_that_is_a_file_is_one_line(run_dir, tmp_path, command):
    out = tmp_path / "model.bin"
    out.write_text("a file of the user's")
    code, err = _cli([command, "--checkpoint_dir", run_dir, "--output_dir", str(out), "--overwrite"])
    assert code == 2 and str(out) in _one_line(err) and "is a file" in err
    assert out.read_text() == "a file of the user's" and os.listdir(tmp_path) == ["model.bin"]


# ----------------------------------------------------------------------------- the vocabulary through t5x

def test_t5x_round_trip_keeps_the_vocabulary(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import seqio
    direct, t5x_dir, back, via_t5x = (str(tmp_path / n) for n in ("hf_direct", "t5x", "back", "hf_via_t5x"))
    assert main(["export-hf", "--checkpoint_dir", run_dir, "--output_dir", direct]) == 0
    assert main(["export-t5x", "--checkpoint_dir", run_dir, "--output_dir", t5x_dir]) == 0
    moved = str(tmp_path / "copied" / "t5x")  # a MODEL_DIR copied elsewhere: the vocabulary beside config.gin
    shutil.move(t5x_dir, moved)
    assert main(["import-t5x", "--checkpoint_dir", os.path.join(moved, "checkpoint_3"), "--output_dir", back]) == 0
    _, payload = checkpoints.read_config(back)
    assert payload["vocab_path"] and payload["extra_ids"] == 100
    assert main(["export-hf", "--checkpoint_dir", back, "--output_dir", via_t5x]) == 0

    original = seqio.SentencePieceVocabulary(checkpoints.vocabulary_path(run_dir), extra_ids=100)
    tokenizers = [transformers.AutoTokenizer.from_pretrained(d, local_files_only=True) for d in (direct, via_t5x)]
    texts = ["kalo mitre sunba the cat", "<extra_id_0> rozi <extra_id_99> paquel", "café 😀 nor"]
    for text in texts:
        want = [int(i) for i in original.encode(text)]
        assert [t(text, add_special_tokens=False).input_ids for t in tokenizers] == [want, want], text
    assert max(int(i) for i in original.encode("<extra_id_0>")) == PIECES + 100 - 1


def test_import_t5x_names_a_missing_gin_vocabulary(run_dir, tmp_path):
    t5x_dir = str(tmp_path / "t5x")
    assert main(["export-t5x", "--checkpoint_dir", run_dir, "--output_dir", t5x_dir]) == 0
    os.remove(os.path.join(t5x_dir, "sentencepiece.model"))
    code, err = _cli(["import-t5x", "--checkpoint_dir", t5x_dir, "--output_dir", str(tmp_path / "back")])
    assert code == 2 and "sentencepiece.model" in _one_line(err) and "--vocab_path" in err
    assert not (tmp_path / "back").exists()


# ----------------------------------------------------------------------------- Ctrl-C

def _interrupt(argv, parent, delay):
    """Start `ul2lab argv`, send SIGINT once its temporary folder appears in `parent` (it writes) or after
    `delay` s, whichever is first; (exit code, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "ul2lab.cli.main", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + delay
    while time.monotonic() < end and process.poll() is None:
        if any(n.endswith(".tmp") for n in os.listdir(parent)):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.slow
# from half a second on (before, the interpreter is still starting; a shell shows its death by SIGINT as 130
# too): while importing JAX, reading the checkpoint, writing beside the output (30: as soon as it writes)
@pytest.mark.parametrize("command,delay", [("export-hf", 0.5), ("export-hf", 1.5), ("export-hf", 3.0),
                                           ("export-hf", 30.0), ("export-t5x", 30.0)])
def test_ctrl_c_exits_130_with_one_line_and_no_half_export(run_dir, tmp_path, command, delay):
    out = tmp_path / "out"
    previous = str(tmp_path / "previous")
    assert main([command, "--checkpoint_dir", run_dir, "--output_dir", previous]) == 0
    shutil.copytree(previous, out)  # a complete earlier export that --overwrite replaces
    (out / "notes.txt").write_text("kept")
    kept = _snapshot(out)
    new = _snapshot(previous)
    code, err = _interrupt([command, "--checkpoint_dir", run_dir, "--output_dir", str(out), "--overwrite"],
                           str(tmp_path), delay)
    assert code == 130, err
    assert "Traceback" not in err and f"ul2lab {command}: interrupted (Ctrl-C)" in err, err
    now = _snapshot(out)
    # the earlier export whole, or the new one whole (the same files: same checkpoint); never a mix
    assert set(now) == set(kept) and now["notes.txt"] == b"kept"
    assert {k: v for k, v in now.items() if k != "notes.txt"}.keys() == new.keys()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left beside it
