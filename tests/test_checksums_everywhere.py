"""Checksums on every path: every import writes a checksum per array (computed while the arrays stream
through, one at a time), every reader of a step checks them (export-t5x too, array by array), and a
step without checksums, or with arrays missing from them, is refused in one line naming the flag that
accepts it. The filter that drops the reads a failed restore abandoned is active only around that
restore, and says how many it dropped."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from test_integrity import corrupt_largest_params_file, trained_run  # noqa: F401  (a fixture)
from test_t5x import _cli, _mtf_arrays, _t5x_adafactor_checkpoint, _t5x_model_dir, _write_tf_checkpoint
from test_trainer import make_config, synthetic_batches
from ul2lab.train import checkpoints, integrity
from ul2lab.train import loop as trainer
from ul2lab.train import state as train_state


def _checksums_path(run, step):
    return os.path.join(str(run), str(step), checkpoints.CHECKSUMS_ITEM, checkpoints.JSON_ITEM_FILE)


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("ul2lab ")]  # not library log lines
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- imports write them

def _import_t5x(tmp_path):
    out = str(tmp_path / "from_t5x")
    code, err = _cli(["import-t5x", "--checkpoint_dir", _t5x_model_dir(tmp_path / "t5x"), "--output_dir", out])
    assert code == 0, err
    return out


def _import_t5x_with_state(tmp_path):
    _t5x_adafactor_checkpoint(tmp_path / "t5x_opt", 7, np.random.default_rng(0))
    out = str(tmp_path / "from_t5x_opt")
    code, err = _cli(["import-t5x", "--checkpoint_dir", str(tmp_path / "t5x_opt"), "--output_dir", out,
                      "--with_optimizer_state"])
    assert code == 0, err
    return out


def _import_mtf(tmp_path):
    folder = tmp_path / "mtf"
    folder.mkdir()
    _write_tf_checkpoint(str(folder / "model.ckpt-1000"), _mtf_arrays(True, np.random.default_rng(7)), 1000)
    out = str(tmp_path / "from_mtf")
    code, err = _cli(["import-mtf", "--checkpoint_dir", str(folder), "--output_dir", out])
    assert code == 0, err
    return out


@pytest.mark.parametrize("make", [_import_t5x, _import_t5x_with_state, _import_mtf],
                         ids=["import_t5x", "import_t5x_with_optimizer_state", "import_mtf"])
def test_imports_write_a_checksum_for_every_array(tmp_path, make):
    out = make(tmp_path)
    step = checkpoints.all_steps(out)[-1]
    saved = checkpoints.read_checksums(out, step)
    assert saved is not None, "the import wrote no checksums"
    _, params, _ = checkpoints.load_params(out)
    expected = integrity.digests({"params": params})["arrays"]
    assert {k: saved["arrays"][k] for k in expected} == expected  # each digest is of the array as written
    if make is _import_t5x_with_state:  # the optimizer state's arrays are covered too
        assert len(saved["arrays"]) > len(expected)
        assert any(k.startswith("['opt_state']") for k in saved["arrays"])


# ----------------------------------------------------------------------------- readers check them

@pytest.mark.parametrize("command", ["export-t5x", "export-hf"])
def test_exports_refuse_a_step_whose_digest_was_tampered(tmp_path, command):
    out = _import_t5x(tmp_path)
    path = _checksums_path(out, 0)
    saved = json.load(open(path))
    name = "['params']['decoder']['layers_1']['mlp']['wo']['kernel']"
    saved["arrays"][name][0] ^= 1
    json.dump(saved, open(path, "w"))
    target = tmp_path / "exported"
    before = set(os.listdir(tmp_path))
    code, err = _cli([command, "--checkpoint_dir", out, "--output_dir", str(target)])
    assert code == 2, err
    line = _one_error_line(err)
    assert "params/decoder/layers_1/mlp/wo/kernel" in line and "does not match the checksum" in line, line
    assert not target.exists() and set(os.listdir(tmp_path)) == before  # nothing written, no temporary folder


@pytest.mark.parametrize("command", ["export_t5x", "export_hf", "infer_score", "eval"])
def test_every_reader_refuses_a_step_without_checksums_and_names_the_flag(trained_run, tmp_path, command):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "6" / checkpoints.CHECKSUMS_ITEM)
    (tmp_path / "in.jsonl").write_text(json.dumps({"inputs": "ka lo", "targets": "mi ne"}) + "\n")
    argv = {
        "export_t5x": ["export-t5x", "--checkpoint_dir", str(run), "--output_dir", str(tmp_path / "t5x")],
        "export_hf": ["export-hf", "--checkpoint_dir", str(run), "--output_dir", str(tmp_path / "hf")],
        "infer_score": ["infer", "--checkpoint_dir", str(run), "--input_file", str(tmp_path / "in.jsonl"),
                        "--output_file", str(tmp_path / "out.jsonl"), "--mode", "score"],
        "eval": ["eval", "--checkpoint_dir", str(run), "--mixture_or_task", "synthetic_never_reached"],
    }[command]
    code, err = _cli(argv)
    assert code == 2, err
    line = _one_error_line(err)
    assert f"{run}/6 has no checksums" in line and "--allow_missing_checksums" in line, line
    assert not any(p.exists() for p in (tmp_path / "t5x", tmp_path / "hf", tmp_path / "out.jsonl"))
    code, err = _cli(argv + ["--allow_missing_checksums"])
    if code:
        assert "checksums" not in _one_error_line(err), err
    # eval's task does not exist, and the fixture's vocabulary is larger than its tiny model (which
    # export-hf refuses): both get past the checksums and stop later
    assert code == (2 if command in ("eval", "export_hf") else 0), err


def test_a_step_with_an_array_missing_from_its_checksums_is_refused(trained_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = _checksums_path(run, 6)
    saved = json.load(open(path))
    del saved["arrays"]["['params']['encoder']['layers_0']['mlp']['wo']['kernel']"]
    json.dump(saved, open(path, "w"))
    with pytest.raises(checkpoints.MissingChecksumsError, match="no checksum for params/encoder/layers_0/mlp/wo"):
        checkpoints.load_params(str(run))
    with pytest.raises(checkpoints.MissingChecksumsError, match="no checksum for params/encoder/layers_0/mlp/wo"):
        checkpoints.param_arrays(str(run))
    checkpoints.load_params(str(run), allow_missing_checksums=True)


def test_train_refuses_to_resume_a_step_without_checksums_and_keeps_it(trained_run, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "6" / checkpoints.CHECKSUMS_ITEM)
    with pytest.raises(checkpoints.MissingChecksumsError, match="TrainConfig.allow_missing_checksums = True"):
        trainer.train(make_config(run, train_steps=8, async_checkpoints=False), synthetic_batches())
    assert checkpoints.all_steps(str(run)) == [3, 6]  # not set aside as corrupt: nothing is wrong with it
    assert not [d for d in os.listdir(run) if d.startswith("corrupt-")]
    result = trainer.train(make_config(run, train_steps=8, async_checkpoints=False, allow_missing_checksums=True),
                           synthetic_batches())
    assert result["history"][0]["step"] == 7
    assert "has no checksums" in capsys.readouterr().out


def test_initial_checkpoint_without_checksums_is_refused(trained_run, tmp_path):  # noqa: F811
    source = tmp_path / "source"
    shutil.copytree(trained_run, source)
    shutil.rmtree(source / "6" / checkpoints.CHECKSUMS_ITEM)
    with pytest.raises(checkpoints.MissingChecksumsError, match="allow_missing_checksums"):
        trainer.train(make_config(tmp_path / "new", train_steps=7, initial_checkpoint_path=str(source),
                                  async_checkpoints=False), synthetic_batches())
    result = trainer.train(make_config(tmp_path / "new2", train_steps=7, initial_checkpoint_path=str(source),
                                       async_checkpoints=False, allow_missing_checksums=True), synthetic_batches())
    assert result["history"][0]["step"] == 7


def test_a_resumed_import_with_optimizer_state_checks_its_checksums(tmp_path):
    out = _import_t5x_with_state(tmp_path)
    path = _checksums_path(out, 7)
    saved = json.load(open(path))
    name = next(k for k in saved["arrays"] if k.startswith("['opt_state']") and "v_row" in k)
    saved["arrays"][name][1] ^= 1
    json.dump(saved, open(path, "w"))
    from test_t5x import OPT
    from ul2lab.models.network import init_params
    abstract_params = jax.eval_shape(lambda: init_params(OPT, jax.random.PRNGKey(0)))
    abstract_opt = jax.eval_shape(train_state.default_optimizer(lambda count: 0.0).init, abstract_params)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="does not match the checksum"):
        checkpoints.RunCheckpoints(out, async_save=False).restore(7, abstract_params, abstract_opt)


# ----------------------------------------------------------------------------- the abandoned-reads filter

def test_the_abandoned_reads_filter_is_active_only_around_the_failed_restore(trained_run, tmp_path):  # noqa: F811
    """After a restore failed, an unraisable "Event loop is closed" of anyone else (reported with no object,
    as tensorstore's are; and one from an object's __del__) reaches the hook that was there before."""
    import _testcapi

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    corrupt_largest_params_file(run / "6", at=0.0)
    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: seen.append(str(unraisable.exc_value))
    try:
        recorder = sys.unraisablehook
        with pytest.raises(checkpoints.CorruptCheckpointError):
            checkpoints.load_params(str(run), step=6)
        assert sys.unraisablehook is recorder  # nothing stays installed
        seen.clear()

        class ClosesALoopLate:
            def __del__(self):
                raise RuntimeError("Event loop is closed")

        ClosesALoopLate()
        _testcapi.write_unraisable_exc(RuntimeError("Event loop is closed"), None, None)
        assert seen == ["Event loop is closed", "Event loop is closed"]
    finally:
        sys.unraisablehook = before


def test_the_filter_counts_what_it_drops_in_one_line():
    import _testcapi

    lines = []
    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: seen.append(str(unraisable.exc_value))
    try:
        with pytest.raises(ValueError):
            with checkpoints.AbandonedReadsQuieted(log=lines.append):
                _testcapi.write_unraisable_exc(RuntimeError("Event loop is closed"), None, None)
                _testcapi.write_unraisable_exc(RuntimeError("something else"), None, None)
                raise ValueError("the restore failed")
        assert seen == ["something else"]
        assert len(lines) == 1 and "dropped 1 report " in lines[0], lines
        _testcapi.write_unraisable_exc(RuntimeError("Event loop is closed"), None, None)
        assert seen == ["something else", "Event loop is closed"]
    finally:
        sys.unraisablehook = before
