"""Runs that used to never end: a task whose filters drop every example (the training pipeline
repeats its source forever), and a run waiting for data that SIGTERM / Ctrl-C could not stop.
Each case runs in a child process with a timeout that FAILS the test when it is reached."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ul2lab.data import linearize, text_sources

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300  # far above the seconds these take; reaching it means the hang is back


def run_child(code: str, timeout: int = TIMEOUT, send=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (this tree, CPU); kill it and FAIL if it outlives `timeout`.
    `send` = (signal, text): send the signal once `text` appears in its output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    import threading
    lines = []

    def read():
        for line in child.stdout:
            lines.append(line)
            if send and send[1] in line:
                child.send_signal(send[0])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        reader.join(5)
        pytest.fail(f"still running after {timeout}s (a hang):\n{''.join(lines)[-3000:]}")
    reader.join(10)
    return subprocess.CompletedProcess(child.args, child.returncode, "".join(lines))


CHECK_TASK = """
    import seqio, sys
    from ul2lab.models.config import preset
    from ul2lab.runs import train as train_run
    from ul2lab.train import loop as trainer
    from ul2lab.train import schedules
    {register}
    config = trainer.TrainConfig(model_dir={model_dir!r}, model=preset("tiny", vocab_size=1024), mixture_or_task_name=name,
                                 task_feature_lengths={lengths!r}, train_steps=5, batch_size=2,
                                 learning_rate=schedules.constant_schedule(0.01), num_devices=1,
                                 mesh_shape={{"data": 1, "fsdp": 1, "model": 1}})
    try:
        train_run.train_task(config)
    except trainer.ConfigError as e:
        print("ERROR:", e)
        sys.exit(2)
"""


def test_an_empty_corpus_is_an_error_not_a_spinning_pipeline(tiny_vocabulary, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    register = f"""
    import ul2lab_tasks.text as text_tasks
    name = "hang_empty_corpus"
    text_tasks.local_text_task(name, {str(tmp_path / '*.txt')!r}, vocabulary={tiny_vocabulary.sentencepiece_model_file!r})
    """
    result = run_child(CHECK_TASK.format(register=textwrap.dedent(register).replace("\n", "\n    "),
                                         model_dir=str(tmp_path / "run"), lengths={"inputs": 64, "targets": 64}))
    assert result.returncode == 2, result.stdout[-3000:]
    error = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")][0]
    assert "task 'hang_empty_corpus'" in error and ("has no data" in error or "produced no example" in error), error
    assert not (tmp_path / "run").exists()  # nothing written


def test_tables_whose_headers_never_fit_are_an_error_naming_the_filter_and_setting(table_vocabulary, tmp_path):
    header = ",".join(f"a very long column title number {i}" for i in range(40))
    (tmp_path / "t.csv").write_text(header + "\n" + ",".join(str(i) for i in range(40)) + "\n")
    register = f"""
    import ul2lab_tasks.tables as table_tasks
    name = table_tasks.register_table_corpus_task("hang_wide_tables", {str(tmp_path)!r},
                                                   vocabulary=seqio.SentencePieceVocabulary({table_vocabulary.sentencepiece_model_file!r}, extra_ids=100))
    """
    result = run_child(CHECK_TASK.format(register=textwrap.dedent(register).replace("\n", "\n    "),
                                         model_dir=str(tmp_path / "run"), lengths={"inputs": 32, "targets": 32}))
    assert result.returncode == 2, result.stdout[-3000:]
    error = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")][0]
    assert "hang_wide_tables" in error and "header" in error and "TASK_FEATURE_LENGTHS['inputs']" in error, error


WAIT_FOR_DATA = """
    import os
    import threading
    import time
    from test_trainer import make_config, packed_batch
    from ul2lab.train import loop as trainer
    from ul2lab.runs.train import exit_code

    def batches(skip):
        for index in range(skip, 3):
            yield packed_batch(100 + index % 2)
        metrics = os.path.join({model_dir!r}, "metrics.jsonl")
        while not os.path.exists(metrics) or len(open(metrics).readlines()) < 3:  # step 3 is done
            time.sleep(0.05)
        print("waiting for data forever", flush=True)
        threading.Event().wait()  # a source that never produces the next batch

    result = trainer.train(make_config({model_dir!r}, train_steps=10, async_checkpoints=False), batches)
    print("step", result["step"], "exit", exit_code(result), flush=True)
    raise SystemExit(exit_code(result))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_run_waiting_for_data_and_saves_its_step(signum, code, tmp_path):
    result = run_child(WAIT_FOR_DATA.format(model_dir=str(tmp_path / "run")),
                       send=(signum, "waiting for data forever"))
    assert result.returncode == code, result.stdout[-3000:]
    assert "step 3 exit" in result.stdout and "saved step 3" in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert "3" in os.listdir(tmp_path / "run")
    # no silence before step 1: the run says what it is doing while it compiles and waits
    assert "initializing a new model" in result.stdout and "waiting for the first batch and compiling" in result.stdout


def test_huge_documents_are_cut_before_tokenization_and_counted():
    before = text_sources.SKIPPED_INPUT["long_documents_split"]
    doc = ("word " * 70_000) + "x" * 150_000  # 500k characters, the last 150k without a space
    pieces = list(text_sources.split_long_documents(["short", doc]))
    assert pieces[0] == "short" and "".join(pieces[1:]) == doc  # nothing lost
    assert all(len(p) <= text_sources.MAX_DOCUMENT_CHARS for p in pieces)
    assert text_sources.SKIPPED_INPUT["long_documents_split"] == before + 1


def test_a_huge_cell_is_cut_before_it_is_tokenized(table_vocabulary):
    class Recording:  # the vocabulary, recording the lengths of the texts it is asked to encode
        def __init__(self):
            self.lengths = []

        def encode(self, text):
            self.lengths.append(len(text))
            return table_vocabulary.encode(text)

    vocabulary = Recording()
    text, ids, cut = linearize._Encoder(vocabulary).cap("12,467 " * 1_000_000, 8)  # noqa: SLF001  a 7 MB cell
    assert cut and 0 < len(ids) <= 8 and text.startswith("12,467")
    assert max(vocabulary.lengths) <= linearize.MAX_PIECE_CHARS * 10
