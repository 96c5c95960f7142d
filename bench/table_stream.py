"""Peak memory reading a table corpus streamed from disk, at 1x and 10x the corpus.

Writes a synthetic corpus of CSV shards (--files tables of --rows x --cols cells; the 10x corpus
has ten times the files), then, in a fresh process per corpus, reads every table of the "train"
split through ul2lab.data.table_files.TableFilesSource (what `register_table_corpus_task` reads
from a directory, a few files at a time) and reports the process's peak RSS
(getrusage ru_maxrss). --in_memory also measures the old way, every table read into a list
(ul2lab.data.tables.iter_tables), for contrast. Prints one JSON object; `ratio_10x_to_1x` is the
figure the issue bounds (<= 1.3).

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


def read_all(directory: str, how: str) -> dict:
    """In this process: read every table of the corpus; its count, bytes and the peak RSS."""
    import resource

    start = time.perf_counter()
    if how == "stream":
        from ul2lab.data import table_files

        source = table_files.TableFilesSource(directory)
        count = size = 0
        for example in source.get_dataset("train", shuffle=True, seed=0).as_numpy_iterator():
            count += 1
            size += len(example["table"])
    else:
        from ul2lab.data import tables

        held = [t.to_json() for t in tables.iter_tables(directory)]
        count, size = len(held), sum(map(len, held))
    return {"tables": count, "table_json_mb": round(size / 2 ** 20, 1), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


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
    report["ratio_10x_to_1x"] = round(report["10x"]["streamed"]["peak_rss_mb"] / report["1x"]["streamed"]["peak_rss_mb"], 3)
    if args.in_memory:
        report["in_memory_ratio_10x_to_1x"] = round(
            report["10x"]["in_memory"]["peak_rss_mb"] / report["1x"]["in_memory"]["peak_rss_mb"], 3)
    print(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
