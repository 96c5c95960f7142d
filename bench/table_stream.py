"""Peak memory reading a table corpus streamed from disk, at 1x and 10x the corpus.

Writes a synthetic corpus of CSV shards (--files tables of --rows x --cols cells; the 10x corpus
has ten times the files), then, in a fresh process per corpus, reads every table of the "train"
split through ul2lab.data.table_files.TableFilesSource (what `register_table_corpus_task` reads
from a directory, a few files at a time) and reports the process's peak RSS (getrusage ru_maxrss).
The same process first does only the imports reading needs (TensorFlow, seqio, ul2lab.data): its
RSS then is `imports_rss_mb`, and `above_imports_mb` = peak - that, the memory reading the corpus
took (the peak is reset after the imports, /proc/self/clear_refs, so an import's transient peak is
not counted). --in_memory also measures the old way, every table read into a list
(ul2lab.data.tables.iter_tables), for contrast. Prints one JSON object; `ratio_10x_to_1x` is the
figure the issue bounds (<= 1.3), of the peaks above the imports (`ratio_10x_to_1x_whole_process`:
of the whole process's peaks, which the imports dominate).

    python bench/table_stream.py [--files 300] [--rows 200] [--cols 8] [--in_memory] [--workdir DIR]
"""
import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(directory: str, files: int, rows: int, cols: int, seed: int):
    """`files` CSV tables in 10 sub-folders (shards), random words and numbers."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    for i in range(files):
        shard = os.path.join(directory, f"shard-{i % 10:02d}")
        os.makedirs(shard, exist_ok=True)
        with open(os.path.join(shard, f"table-{i:06d}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([f"column {c}" for c in range(cols)])
            for _ in range(rows):
                writer.writerow([" ".join(rng.choices(words, k=3)) if c % 2 else str(rng.randint(0, 10 ** 6))
                                 for c in range(cols)])


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or its peak since start or the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so the peak is the reading's, not an import's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_all(directory: str, how: str) -> dict:
    """In this process: the imports alone (their RSS), then read every table of the corpus; the count,
    bytes, the peak RSS and the peak above the imports."""
    import resource

    import seqio  # noqa: F401  what reading imports, measured before any table is read
    import tensorflow  # noqa: F401

    from ul2lab.data import table_files, tables
    imports_rss = rss_mb()
    imports_peak = rss_mb("VmHWM")
    peak_reset = reset_peak()
    start = time.perf_counter()
    if how == "stream":
        source = table_files.TableFilesSource(directory)
        count = size = 0
        for example in source.get_dataset("train", shuffle=True, seed=0).as_numpy_iterator():
            count += 1
            size += len(example["table"])
    else:
        held = [t.to_json() for t in tables.iter_tables(directory)]
        count, size = len(held), sum(map(len, held))
    whole = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    reading = rss_mb("VmHWM") if peak_reset else whole
    return {"tables": count, "table_json_mb": round(size / 2 ** 20, 1), "seconds": round(time.perf_counter() - start, 1),
            "imports_rss_mb": imports_rss, "imports_peak_rss_mb": imports_peak, "peak_rss_mb": whole,
            "reading_peak_rss_mb": reading, "above_imports_mb": round(reading - imports_rss, 1),
            "reading_peak_from": "the end of the imports (VmHWM reset)" if peak_reset else "process start (ru_maxrss)"}


def measure(directory: str, how: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_read", directory, "--_how", how],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"reading {directory} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="CSV tables in the 1x corpus")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--in_memory", action="store_true", help="also read both corpora into memory, the old way")
    parser.add_argument("--workdir", default="", help="kept when given (default: a temporary folder)")
    parser.add_argument("--_read", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_how", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._read:
        print(json.dumps(read_all(args._read, args._how)))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="ul2lab-table-stream-")
    report = {"rows": args.rows, "cols": args.cols, "cpu_count": os.cpu_count()}
    for scale in (1, 10):
        directory = os.path.join(workdir, f"corpus-{scale}x")
        if not os.path.isdir(directory):
            write_corpus(directory, args.files * scale, args.rows, args.cols, seed=scale)
        corpus_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs) / 2 ** 20
        entry = {"files": args.files * scale, "corpus_mb": round(corpus_mb, 1), "streamed": measure(directory, "stream")}
        if args.in_memory:
            entry["in_memory"] = measure(directory, "in_memory")
        report[f"{scale}x"] = entry
    report["measured"] = ("each corpus read in a fresh process. imports_rss_mb: its RSS after only the imports "
                          "(TensorFlow, seqio, ul2lab.data; imports_peak_rss_mb their peak); reading_peak_rss_mb: "
                          "the peak RSS while reading (VmHWM reset after the imports); above_imports_mb: "
                          "reading_peak_rss_mb - imports_rss_mb, what reading the corpus took; peak_rss_mb: the "
                          "whole process's peak (ru_maxrss)")
    for name, how in (("", "streamed"), ("in_memory_", "in_memory")):
        if how in report["1x"]:
            one, ten = report["1x"][how], report["10x"][how]
            report[f"{name}ratio_10x_to_1x"] = round(ten["above_imports_mb"] / max(one["above_imports_mb"], 0.1), 3)
            report[f"{name}ratio_10x_to_1x_whole_process"] = round(ten["peak_rss_mb"] / one["peak_rss_mb"], 3)
    print(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
