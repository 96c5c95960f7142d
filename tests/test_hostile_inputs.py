"""Hostile inputs, one table: every case gives a clear error that names the input, or is read with
the bad part skipped and counted. Never a crash deep inside a running job with an unreadable trace.

Each case is (id, make(tmp_path, request) -> result, expectation):
  raises(ErrorClass, pattern)  the error's message must match `pattern` ({tmp} = the case's tmp_path)
  passes(check)                check(result, tmp_path) asserts what was used, skipped and counted
"""
import collections
import json
import os
import re
import uuid

import numpy as np
import pytest

from ul2lab.train import checkpoints, schedules
from ul2lab.train import loop as trainer
from ul2lab.data import linearize, tables, text_sources
from ul2lab.errors import UserError
from ul2lab.models.config import preset
from ul2lab.runs import train as train_run
from ul2lab.data.objectives import mixture

DOC = ("The data give the number of cases of a disease in each county of a state over ten years, "
       "with the population of each county and the year in which the count was made. ") * 4


def raises(error, pattern):
    return ("raises", error, pattern)


def passes(check):
    return ("passes", check)


# ---- helpers that put an input through the code a run would use ----------------------------

def write(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path


def text_pipeline(files, max_examples=40):
    """Files -> local_text_task (T5 span corruption, the tiny vocabulary) -> examples and counts."""
    def make(tmp_path, request):
        import seqio
        import ul2lab_tasks.text as text_tasks
        vocabulary = request.getfixturevalue("tiny_vocabulary")
        write(tmp_path, files)
        name = f"hostile_{uuid.uuid4().hex[:8]}"
        skipped_text, skipped_input = dict(mixture.SKIPPED_TEXT.counts), collections.Counter(text_sources.SKIPPED_INPUT)
        task = text_tasks.local_text_task(name, str(tmp_path / "*"), vocabulary=vocabulary, denoisers="T5")
        try:
            examples = list(task.get_dataset({"inputs": 128, "targets": 32}, shuffle=False, seed=0)
                            .take(max_examples).as_numpy_iterator())
        finally:
            seqio.TaskRegistry.remove(name)
        counts = {k: mixture.SKIPPED_TEXT.counts[k] - skipped_text[k] for k in skipped_text}
        counts.update({k: v - skipped_input[k] for k, v in text_sources.SKIPPED_INPUT.items()})
        return examples, counts
    return make


def fits(examples):
    return all(len(e["inputs"]) <= 128 and len(e["targets"]) <= 32 for e in examples)


def check_run(before=None, **overrides):
    """trainer.check of a run config: what `ul2lab train` does before any work."""
    def make(tmp_path, request):
        if before is not None:
            before()
        settings = dict(model_dir=str(tmp_path / "run"), model=preset("tiny"), mixture_or_task_name="synthetic",
                        task_feature_lengths={"inputs": 32, "targets": 32}, train_steps=10, batch_size=8,
                        learning_rate=schedules.constant_schedule(0.01), num_devices=1,
                        mesh_shape={"data": 1, "fsdp": 1, "model": 1})
        with_task = overrides.pop("with_task", False)
        settings.update({k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()})
        config = trainer.TrainConfig(**settings)
        train_run.check(config) if with_task else trainer.check(config)
        assert not os.path.exists(settings["model_dir"]) or os.path.isfile(settings["model_dir"])
    return make


def gin_config(*bindings):
    def make(tmp_path, request):
        return train_run.load_train_config(["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin"],
                                           [f"MODEL_DIR = '{tmp_path}/run'", *bindings])
    return make


def read_table(name, content):
    def make(tmp_path, request):
        write(tmp_path, {name: content})
        return tables.read_table_file(str(tmp_path / name))
    return make


def read_and_linearize(name, make_content, max_tokens=512):
    def make(tmp_path, request):
        write(tmp_path, {name: make_content()})
        table = tables.read_table_file(str(tmp_path / name))
        return table, linearize.linearize(table, None, max_tokens)
    return make


def sentencepiece_vocab(path_of):
    def make(tmp_path, request):
        import ul2lab_tasks.text as text_tasks
        return text_tasks.sentencepiece_file_vocabulary(path_of(tmp_path, request))
    return make


def plan(denoisers, vocabulary_of=lambda request: request.getfixturevalue("tiny_vocabulary"), lengths=None):
    def make(tmp_path, request):
        return mixture.plan_denoisers(denoisers, lengths or {"inputs": 128, "targets": 32}, vocabulary_of(request))
    return make


def no_extra_ids_vocabulary(request):
    import seqio
    vocabulary = request.getfixturevalue("tiny_vocabulary")
    return seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=0)


def checkpoint_dir(config_json=None, params=None):
    """A directory holding `config_json` (text) and/or a params-only checkpoint of `params`."""
    def build(tmp_path):
        path = tmp_path / "ckpt"
        if params is not None:
            checkpoints.save_params(str(path), params, preset("tiny"))
        if config_json is not None:
            path.mkdir(exist_ok=True)
            (path / "config.json").write_text(config_json)
        path.mkdir(exist_ok=True)
        return str(path)
    return build


def restore_params_into_tiny(build):
    def make(tmp_path, request):
        import jax
        from ul2lab.models import network
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          network.abstract_params(preset("tiny")))
        return checkpoints.load_params(build(tmp_path), abstract_params=abstract)
    return make


def read_checkpoint_config(build):
    return lambda tmp_path, request: checkpoints.read_config(build(tmp_path))


def register_wide_vocabulary_task():
    import seqio
    name = "hostile_wide_vocabulary"
    if name not in seqio.TaskRegistry.names():
        vocabulary = seqio.PassThroughVocabulary(100_000, eos_id=1)
        seqio.TaskRegistry.add(name, seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: None,
                                                              splits=["train"]),
                               preprocessors=[], output_features={k: seqio.Feature(vocabulary)
                                                                  for k in ("inputs", "targets")})


def table_directory(tmp_path, request):
    (tmp_path / "tables").mkdir()
    write(tmp_path / "tables", {"good.tsv": "a\tb\n1\t2\n", "empty.csv": "", "junk.csv": b"\xff\xfe\x00,1\n",
                                "unbalanced.csv": '"a","b\n"1","2"\n', "notes.txt": "not a table"})
    stats = collections.Counter()
    return list(tables.iter_tables(str(tmp_path / "tables"), stats=stats)), stats


def jsonl_tables(tmp_path, request):
    lines = [json.dumps({"header": ["a", "b"], "rows": [[1, 2]]}), '{"header": ["a"], "rows": [[1', "[1, 2, 3]",
             json.dumps({"header": "a,b", "rows": [[1, 2]]}), json.dumps({"rows": [7]}),
             json.dumps({"rows": [{"x": 1, "y": None}]})]
    write(tmp_path, {"t.jsonl": "\n".join(lines) + "\n"})
    stats = collections.Counter()
    return list(tables.read_jsonl(str(tmp_path / "t.jsonl"), stats)), stats


def wide_table_through_the_table_objective(tmp_path, request):
    """A 10k-column table's header alone exceeds the budget: the table objective drops it, counted."""
    import seqio
    import tensorflow as tf
    from ul2lab.data import table_objectives
    write(tmp_path, {"wide.tsv": "\t".join(f"c{i}" for i in range(10_000)) + "\n" + "\t".join("x" * 10_000) + "\n",
                     "good.tsv": "a\tb\n1\t2\n"})
    tables_json = [tables.read_table_file(str(tmp_path / n), source=n).to_json() for n in ("wide.tsv", "good.tsv")]
    features = {"targets": seqio.Feature(request.getfixturevalue("tiny_vocabulary"))}
    before = table_objectives.SKIPPED["header_over_budget"]
    dataset = table_objectives.linearize_tables(tf.data.Dataset.from_tensor_slices({"table": tables_json}),
                                                {"inputs": 512}, features)
    texts = [e["table_text"].decode() for e in dataset.as_numpy_iterator()]
    return texts, table_objectives.SKIPPED["header_over_budget"] - before


def csv_bomb():
    return '"a","b"\n' + '"1","2"\n' * 1_000_000


# ---- issue 12's classes: damaged checkpoints, tasks that yield nothing, resumes that would lose data

def tiny_checkpoint(tmp_path, request, params_fn=None):
    """A params-only checkpoint of the tiny model with the tiny vocabulary inside; its directory."""
    import jax
    from ul2lab.models import network
    config = preset("tiny")
    params = jax.jit(lambda rng: network.init_params(config, rng))(jax.random.PRNGKey(0))
    if params_fn is not None:
        params = params_fn(params)
    vocab_path = str(tmp_path / "source.model")
    with open(request.getfixturevalue("tiny_vocabulary").sentencepiece_model_file, "rb") as f:
        (tmp_path / "source.model").write_bytes(f.read())
    checkpoints.save_params(str(tmp_path / "ckpt"), params, config, vocab_path=vocab_path)
    return tmp_path / "ckpt"


def corrupted_checkpoint(tmp_path, request):
    from test_integrity import corrupt_largest_params_file
    path = tiny_checkpoint(tmp_path, request)
    corrupt_largest_params_file(str(path / "0"))
    return checkpoints.load_params(str(path))


def nonfinite_checkpoint(tmp_path, request):
    import jax
    path = tiny_checkpoint(tmp_path, request, lambda params: jax.tree_util.tree_map(lambda x: x * float("nan"), params))
    return checkpoints.load_params(str(path))


def copied_checkpoint(tmp_path, request):
    """A checkpoint copied elsewhere, its original vocabulary file gone: it still finds its vocabulary."""
    import shutil
    path = tiny_checkpoint(tmp_path, request)
    shutil.move(str(path), str(tmp_path / "elsewhere"))
    os.remove(tmp_path / "source.model")
    return checkpoints.vocabulary_path(str(tmp_path / "elsewhere"))


def checkpoint_with_replaced_vocabulary(tmp_path, request):
    path = tiny_checkpoint(tmp_path, request)
    (path / "spiece.model").write_bytes(b"another file")
    return checkpoints.vocabulary_path(str(path))


def run_record_of_batch(batch_size):
    def make(tmp_path, request):
        config = trainer.TrainConfig(model_dir=str(tmp_path / "run"), model=preset("tiny"),
                                     mixture_or_task_name="synthetic", task_feature_lengths={"inputs": 32, "targets": 32},
                                     train_steps=10, batch_size=batch_size, num_devices=1)
        return trainer.batches_to_skip({"mixture_or_task_name": "synthetic", "data_batches": 6, "batch_size": 8,
                                      "step": 6}, config)
    return make


def text_task_check(files, lengths=None):
    """`ul2lab train`'s checks of a local_text_task over `files` (in-process; test_no_hangs runs the
    same with a timeout that fails)."""
    def make(tmp_path, request):
        import seqio
        import ul2lab_tasks.text as text_tasks
        write(tmp_path, files)
        name = f"hostile_{uuid.uuid4().hex[:8]}"
        text_tasks.local_text_task(name, str(tmp_path / "*"), vocabulary=request.getfixturevalue("tiny_vocabulary"),
                                   denoisers="T5")
        try:
            check_run(with_task=True, mixture_or_task_name=name, model=preset("tiny", vocab_size=1024),
                      task_feature_lengths=lengths or {"inputs": 64, "targets": 64})(tmp_path, request)
        finally:
            seqio.TaskRegistry.remove(name)
    return make


def table_corpus_check(files):
    def make(tmp_path, request):
        import seqio
        import ul2lab_tasks.tables as table_tasks
        (tmp_path / "tables").mkdir()
        write(tmp_path / "tables", files)
        name = f"hostile_{uuid.uuid4().hex[:8]}"
        mixture_name = table_tasks.register_table_corpus_task(name, str(tmp_path / "tables"),
                                                              vocabulary=request.getfixturevalue("tiny_vocabulary"))
        try:
            check_run(with_task=True, mixture_or_task_name=mixture_name,
                      model=preset("tiny", vocab_size=1024))(tmp_path, request)
        finally:
            seqio.MixtureRegistry.remove(mixture_name)
            for suffix in ("_mask", "_mod"):
                seqio.TaskRegistry.remove(name + suffix)
    return make


def gin_file(text, *bindings):
    def make(tmp_path, request):
        write(tmp_path, {"run.gin": text})
        return train_run.load_train_config(["models/t5_1_1_tiny.gin", "runs/pretrain_ul2.gin", str(tmp_path / "run.gin")],
                                           [f"MODEL_DIR = '{tmp_path}/run'", *bindings])
    return make


def docstring_example(name, files):
    """The gin example of tasks/text.py's docstring, on files under tmp_path."""
    def make(tmp_path, request):
        import seqio
        write(tmp_path, files)
        try:
            vocabulary = request.getfixturevalue("tiny_vocabulary").sentencepiece_model_file
            return gin_file(f"ul2lab.local_text_task.name = '{name}'\n"
                            f"ul2lab.local_text_task.file_patterns = ['{tmp_path}/*.jsonl']\n"
                            f"ul2lab.local_text_task.vocabulary = '{vocabulary}'\n"
                            "MIXTURE_OR_TASK_NAME = @ul2lab.local_text_task()\n", "TRAIN_STEPS = 10")(tmp_path, request)
        finally:
            if name in seqio.TaskRegistry.names():
                seqio.TaskRegistry.remove(name)
    return make


def score_targets(length):
    def make(tmp_path, request):
        from ul2lab.runs import infer
        return infer._tokenize(request.getfixturevalue("tiny_vocabulary"), ["word " * length], 64, "targets",  # noqa: SLF001
                               "--max_target_length")
    return make


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(tmp_path, request):
    """What the atomic writer leaves when the writer itself creates 0600 files (safetensors, mkstemp)."""
    from ul2lab import files
    with files.atomic_path(str(tmp_path / "model.safetensors")) as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"weights")
        os.close(fd)
    return os.stat(tmp_path / "model.safetensors").st_mode & 0o777


def vocab_from_jsonl_without_field(tmp_path, request):
    from ul2lab.data import vocab
    write(tmp_path, {"d.jsonl": '{"body": "some words here"}\n'})
    return vocab.train_from_files(str(tmp_path / "d.jsonl"), 300, str(tmp_path / "v"))


# ---- the table of cases -------------------------------------------------------------------------

CASES = [
    # text documents -----------------------------------------------------------------------------
    ("text_empty_document", text_pipeline({"a.txt": "", "b.txt": DOC}),
     passes(lambda r, _: r[0] and fits(r[0]) and r[1]["empty_documents"] >= 1)),
    ("text_whitespace_only_document", text_pipeline({"a.txt": " \n\t \n  ", "b.txt": DOC}),
     passes(lambda r, _: r[0] and fits(r[0]) and r[1]["empty_documents"] >= 1)),
    ("text_1mb_single_line", text_pipeline({"a.txt": "word " * 210_000}),
     passes(lambda r, _: len(r[0]) == 40 and fits(r[0]))),
    ("text_invalid_utf8", text_pipeline({"a.txt": DOC.encode() + b" \xff\xfe\xc3 broken bytes " + DOC.encode()}),
     passes(lambda r, _: r[0] and fits(r[0]) and r[1]["invalid_utf8_files"] == 1)),
    ("text_control_characters", text_pipeline({"a.txt": DOC + "\x00\x01\x07\x1b[31m\x0c\x1c\x7f" + DOC}),
     passes(lambda r, _: r[0] and fits(r[0]))),
    ("text_malformed_jsonl_lines",
     text_pipeline({"a.jsonl": json.dumps({"text": DOC}) + '\n{"text": "half a li\n[1, 2]\n'}),
     passes(lambda r, _: r[0] and fits(r[0]) and r[1]["malformed_jsonl_lines"] == 2)),
    ("text_jsonl_without_the_text_field",
     lambda tmp_path, request: list(text_sources.local_text_documents(
         str(write(tmp_path, {"d.jsonl": '{"body": "x"}\n'}) / "d.jsonl"))),
     raises(KeyError, r"{tmp}/d.jsonl:1 has no field 'text' \(it has \['body'\]\)")),
    ("text_glob_matching_nothing", lambda tmp_path, request: text_sources.expand_globs(str(tmp_path / "nope*.txt")),
     raises(FileNotFoundError, r"no file matches '{tmp}/nope\*.txt'")),
    # tables -------------------------------------------------------------------------------------
    ("table_ragged_rows", read_table("r.tsv", "a\tb\tc\n1\n1\t2\t3\t4\n\n"),
     passes(lambda t, _: t.num_columns == 4 and all(len(r) == 4 for r in t.rows) and t.header[3] == "column 4")),
    ("table_10k_columns", wide_table_through_the_table_objective,
     passes(lambda r, _: len(r[0]) == 1 and "a | b" in r[0][0] and r[1] == 1)),
    ("table_empty_header", read_table("h.tsv", "\t\n1\t2\n"),
     raises(tables.TableReadError, r"table file {tmp}/h.tsv is empty or its first line \(the header\) is blank")),
    ("table_empty_file", read_table("e.csv", ""), raises(tables.TableReadError, r"table file {tmp}/e.csv is empty")),
    ("table_binary_junk_cells", read_table("j.csv", b'"a","b"\n"\xff\xfe\x00\x81","2"\n'),
     raises(tables.TableReadError, r"table file {tmp}/j.csv is not UTF-8 text .*re-encode it as UTF-8")),
    ("table_control_characters_in_cells", read_and_linearize("c.tsv", lambda: "a\tb\n1\x00\x07\t\x1b[0m2\n"),
     passes(lambda r, _: r[0].rows[0][1] == "\x1b[0m2" and "row 1" in r[1].text)),
    ("table_csv_bomb_1m_rows", read_and_linearize("bomb.csv", csv_bomb),
     passes(lambda r, _: len(r[0].rows) == 1_000_000 and r[1].truncated and len(r[1].token_ids) <= 512)),
    ("table_unbalanced_quotes", read_table("q.csv", '"a","b\n"1","2"\n'),
     raises(tables.TableReadError, r"table file {tmp}/q.csv is not valid CSV")),
    ("table_unknown_extension", read_table("t.xlsx", b"PK\x03\x04"),
     raises(tables.TableReadError, r"table file {tmp}/t.xlsx has an unknown extension")),
    ("table_jsonl_malformed_lines", jsonl_tables,
     passes(lambda r, _: len(r[0]) == 2 and r[1]["skipped_lines"] == 4 and r[0][1].header == ("x", "y"))),
    ("table_directory_with_bad_files", table_directory,
     passes(lambda r, _: [t.source for t in r[0]] == ["good.tsv"] and r[1]["skipped_files"] == 3)),
    ("table_directory_missing", lambda tmp_path, request: list(tables.iter_tables(str(tmp_path / "none"))),
     raises(tables.TableReadError, r"table directory {tmp}/none does not exist")),
    # configs ------------------------------------------------------------------------------------
    ("config_unknown_gin_name", gin_config("TrainConfg.batch_size = 8"),
     raises(UserError, r"gin: unknown name 'TrainConfg'; did you mean TrainConfig")),
    ("config_unknown_gin_parameter", gin_config("TrainConfig.train_step = 5"),
     raises(UserError, r"TrainConfig has no parameter 'train_step'; did you mean train_steps")),
    ("config_wrong_type_train_steps", check_run(train_steps="many"),
     raises(trainer.ConfigError, r"TRAIN_STEPS is 'many' \(str\); it must be a whole number")),
    ("config_wrong_type_lengths", check_run(task_feature_lengths=[512, 114]),
     raises(trainer.ConfigError, r"TASK_FEATURE_LENGTHS \[512, 114\] is not a dict")),
    ("config_negative_length", check_run(task_feature_lengths={"inputs": -5, "targets": 16}),
     raises(trainer.ConfigError, r"TASK_FEATURE_LENGTHS\['inputs'\] is -5; lengths must be positive")),
    ("config_zero_batch_size", check_run(batch_size=0),
     raises(trainer.ConfigError, r"TRAIN_STEPS \(10\) and BATCH_SIZE \(0\) must be positive")),
    ("config_model_dir_under_a_file", check_run(model_dir=lambda t: (write(t, {"f": "x"}) / "f" / "run").as_posix()),
     raises(trainer.ConfigError, r"MODEL_DIR {tmp}/f/run cannot be created: {tmp}/f is a file")),
    ("config_nonfinite_limit_zero", check_run(max_consecutive_nonfinite=0),
     raises(trainer.ConfigError, r"TrainConfig.max_consecutive_nonfinite \(0\) must be positive")),
    ("config_unknown_axis_rules", check_run(logical_axis_rules="zero3"),
     raises(trainer.ConfigError, r"TrainConfig.logical_axis_rules 'zero3' is not known; use one of")),
    ("config_unregistered_task", check_run(mixture_or_task_name="c4_ul3", with_task=True),
     raises(trainer.ConfigError, r"MIXTURE_OR_TASK_NAME 'c4_ul3' is not a registered seqio task or mixture; "
                                 r"did you mean 'c4_ul2'")),
    ("config_denoiser_rates_sum_to_zero", plan([mixture.r_denoiser(rate=0), mixture.x_denoiser(rate=0.0)]),
     raises(ValueError, r"denoiser rates are all zero \(R\(3, 0.15\): 0, X\(32, 0.5\): 0")),
    ("config_negative_denoiser_rate", plan([mixture.r_denoiser(rate=-1)]),
     raises(ValueError, r"denoiser rates must be finite and non-negative")),
    ("config_noise_density_out_of_range", plan([mixture.r_denoiser(noise_density=1.5)]),
     raises(ValueError, r"noise_density must be in \(0, 1\)")),
    ("config_lengths_too_short_for_denoiser", plan("T5", lengths={"inputs": 128, "targets": 4}),
     raises(ValueError, r"the task's targets length 4 is too short at inputs length 128")),
    # vocabularies -------------------------------------------------------------------------------
    ("vocab_missing_file", sentencepiece_vocab(lambda t, r: str(t / "missing.model")),
     raises(FileNotFoundError, r"vocabulary {tmp}/missing.model does not exist")),
    ("vocab_not_sentencepiece", sentencepiece_vocab(lambda t, r: str(write(t, {"v.model": "hello\n"}) / "v.model")),
     raises(ValueError, r"vocabulary {tmp}/v.model is not a SentencePiece model")),
    ("vocab_without_extra_ids", plan("T5", vocabulary_of=no_extra_ids_vocabulary),
     raises(ValueError, r"marks spans with sentinel ids but the vocabulary .* has none; give the vocabulary at "
                        r"least \d+ sentinels: `ul2lab vocab --extra_ids")),
    ("vocab_larger_than_the_model", check_run(register_wide_vocabulary_task, with_task=True,
                                              mixture_or_task_name="hostile_wide_vocabulary"),
     raises(trainer.ConfigError, r"the vocabulary of 'hostile_wide_vocabulary' has 100000 ids but the model's "
                                 r"vocab_size is 512; set T5Config vocab_size >= 100000")),
    # checkpoints --------------------------------------------------------------------------------
    ("checkpoint_wrong_shape", restore_params_into_tiny(checkpoint_dir(params={"not": np.zeros(3, np.float32)})),
     raises(checkpoints.CheckpointError, r"the parameters in {tmp}/ckpt \(step 0\) do not fit this model")),
    ("checkpoint_hugging_face_dir", read_checkpoint_config(checkpoint_dir(
        config_json=json.dumps({"model_type": "t5", "d_model": 512, "architectures": ["T5ForConditionalGeneration"]}))),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt/config.json is not a ul2lab config.json .* looks like a "
                                         r"Hugging Face config: convert that model with `ul2lab import-hf`")),
    ("checkpoint_other_model_family", read_checkpoint_config(checkpoint_dir(
        config_json=json.dumps({"model": {"n_layer": 12, "n_embd": 768}}))),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt/config.json describes a model ul2lab cannot build: "
                                         r"unknown T5Config fields \['n_embd', 'n_layer'\]")),
    ("checkpoint_truncated_config_json", read_checkpoint_config(checkpoint_dir(config_json='{"model": {"vocab')),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt/config.json cannot be read as JSON")),
    ("checkpoint_dir_without_config", read_checkpoint_config(checkpoint_dir()),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt is not a ul2lab checkpoint directory: it has no config.json")),
    ("checkpoint_model_dir_of_another_shape",
     lambda tmp_path, request: checkpoints.check_same_model(
         checkpoint_dir(params={"w": np.zeros(2, np.float32)})(tmp_path), preset("tiny", num_heads=2)),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt holds a checkpoint of another model shape "
                                         r"\(num_heads: 4 there, 2 now\)")),
    # issue 12: damaged or moved checkpoints ----------------------------------------------------
    ("checkpoint_bytes_corrupted_same_size", corrupted_checkpoint,
     raises(checkpoints.CorruptCheckpointError, r"checkpoint {tmp}/ckpt/0 is corrupt: (the content of params/\S+ "
                                                r"does not match the checksum saved with it|its files cannot be decoded)")),
    ("checkpoint_params_nan", nonfinite_checkpoint,
     raises(checkpoints.CorruptCheckpointError, r"checkpoint {tmp}/ckpt/0 is corrupt: .* hold NaN or inf")),
    ("checkpoint_copied_elsewhere_without_its_vocabulary_file", copied_checkpoint,
     passes(lambda path, tmp: path == str(tmp / "elsewhere" / "spiece.model"))),
    ("checkpoint_vocabulary_replaced", checkpoint_with_replaced_vocabulary,
     raises(checkpoints.CheckpointError, r"the vocabulary file {tmp}/ckpt/spiece.model is not the one {tmp}/ckpt "
                                         r"was written with")),
    ("checkpoint_step_that_does_not_exist",
     lambda tmp_path, request: checkpoints.load_params(str(tiny_checkpoint(tmp_path, request)), step=7),
     raises(checkpoints.CheckpointError, r"{tmp}/ckpt has no checkpoint at step 7; it has steps \[0\]")),
    # issue 12: runs that never ended, or lost data -----------------------------------------------
    ("run_empty_corpus", text_task_check({"a.txt": ""}),
     raises(trainer.ConfigError, r"task 'hostile_\w+' \(split 'train', .*\) (has no data|produced no example)")),
    ("run_whitespace_only_corpus", text_task_check({"a.txt": "  \n\t\n", "b.txt": "\n"}),
     raises(trainer.ConfigError, r"produced no example from all 2 source records")),
    ("run_tables_all_unreadable", table_corpus_check({"e.csv": "", "b.csv": b"\x00\xff\xfe", "l.csv": b"a,b\n\xe9,1\n"}),
     raises(trainer.ConfigError, r"none of its table files can be read")),
    ("run_resumed_with_another_batch_size", run_record_of_batch(16),
     raises(trainer.ConfigError, r"{tmp}/run was trained with BATCH_SIZE 8 \(step 6\), this run has BATCH_SIZE 16")),
    ("run_resumed_with_the_same_batch_size", run_record_of_batch(8), passes(lambda position, _: position == 6)),
    ("run_score_target_of_100k_characters", score_targets(20_000),
     passes(lambda ids, _: len(ids[0]) == 64 and ids[0][-1] == 1)),
    ("run_exported_weights_readable_by_others", new_file_mode,
     passes(lambda mode, _: mode == 0o666 & ~_umask())),
    # issue 12: gin files and flags ----------------------------------------------------------------
    ("config_gin_unbalanced_bracket", gin_file("TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': [32\n"),
     raises(UserError, r"gin: a bracket or string is never closed")),
    ("config_gin_imports_a_missing_module", gin_file("import no_such_module_xyz\n"),
     raises(UserError, r"gin: a gin file imports a module that cannot be imported .*no_such_module_xyz")),
    ("config_task_docstring_example", docstring_example("hostile_docstring_task", {"d.jsonl": '{"text": "words"}\n'}),
     passes(lambda config, _: config.mixture_or_task_name == "hostile_docstring_task")),
    ("config_task_of_missing_files", docstring_example("hostile_docstring_missing", {}),
     raises(UserError, r"gin: no file matches '{tmp}/\*.jsonl'")),
    ("vocab_jsonl_without_the_text_field", vocab_from_jsonl_without_field,
     raises(UserError, r"{tmp}/d.jsonl:1 has no field 'text' .*pass --jsonl_field naming")),
]


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in CASES])
def test_hostile_input(make, expected, tmp_path, request):
    if expected[0] == "raises":
        _, error, pattern = expected
        with pytest.raises(error) as caught:
            make(tmp_path, request)
        message = str(caught.value.args[0]) if caught.value.args else str(caught.value)
        assert "Traceback" not in message and "\n" not in message.strip()
        assert re.search(pattern.replace("{tmp}", re.escape(str(tmp_path))), message), message
    else:
        result = make(tmp_path, request)
        assert expected[1](result, tmp_path)


def test_the_table_covers_every_kind_of_input():
    kinds = collections.Counter(case_id.split("_")[0] for case_id, _, _ in CASES)
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert set(kinds) == {"text", "table", "config", "vocab", "checkpoint", "run"} and min(kinds.values()) >= 4
