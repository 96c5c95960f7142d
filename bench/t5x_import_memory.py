"""Peak host memory of `ul2lab import-t5x` and `ul2lab export-t5x` against the largest array: prints JSON.

    python bench/t5x_import_memory.py [--emb_dim 1024 --vocab_size 32768 --layers 4 --mlp_dim 4096]

Writes a synthetic t5x checkpoint (tensorstore/zarr layout, random float32 arrays, t5x's names and 2-D
attention kernels) into a temporary folder, then runs each command in its own process and reads that
process's peak RSS. The same commands on a tiny checkpoint give the baseline (Python, JAX, orbax,
tensorstore); conversion streams when peak - baseline stays near one array, not the model's size.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ul2lab.interop import t5x, t5x_files  # noqa: E402
from ul2lab.models.config import T5Config  # noqa: E402
from ul2lab.train.checkpoints import LazyArray  # noqa: E402


def synthetic_checkpoint(model_dir: str, config: T5Config) -> dict:
    """A t5x checkpoint of `config` with random arrays, written one at a time; returns sizes in bytes."""
    shapes = t5x.expected_params(config)
    arrays = {}
    for path, shape in shapes.items():
        seed = abs(hash(path)) % 2**31
        lazy = LazyArray(shape, np.float32,
                         lambda shape=shape, seed=seed: np.random.default_rng(seed).standard_normal(shape, np.float32))
        arrays[path] = lazy
    t5x_arrays = t5x.export_params(arrays)
    t5x_files.write_checkpoint(model_dir, 1000, t5x_arrays)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:  # as t5x saves the run's config
        f.write(f"network.T5Config.mlp_activations = {tuple(config.mlp_activations)!r}\n")
    sizes = [a.nbytes for a in t5x_arrays.values()]
    return {"params_bytes": int(sum(sizes)), "largest_array_bytes": int(max(sizes)), "arrays": len(sizes)}


def peak_rss_bytes(argv) -> int:
    """Run `ul2lab argv` in a fresh process (through a parent that only waits) and return its peak RSS."""
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
             "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ul2lab.cli.main", *argv],
                         capture_output=True, text=True, env=env, check=True)
    code, kib = out.stdout.split()
    if code != "0":
        raise SystemExit(f"ul2lab {' '.join(argv)} failed: {out.stderr}")
    return int(kib) * 1024  # Linux reports ru_maxrss in KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emb_dim", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp_dim", type=int, default=4096)
    parser.add_argument("--num_heads", type=int, default=16)
    args = parser.parse_args()
    big = T5Config(vocab_size=args.vocab_size, emb_dim=args.emb_dim, num_heads=args.num_heads,
                   num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                   head_dim=args.emb_dim // args.num_heads, mlp_dim=args.mlp_dim, dtype="float32")
    tiny = T5Config(vocab_size=256, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                    head_dim=16, mlp_dim=64, dtype="float32")
    result = {"model_config": {k: getattr(big, k) for k in ("vocab_size", "emb_dim", "num_heads",
                                                              "num_encoder_layers", "mlp_dim")}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        for name, config in (("baseline", tiny), ("model", big)):
            source = os.path.join(root, name, "t5x")
            sizes = synthetic_checkpoint(source, config)
            imported = os.path.join(root, name, "ul2lab")
            exported = os.path.join(root, name, "t5x_again")
            rss_import = peak_rss_bytes(["import-t5x", "--checkpoint_dir", source, "--output_dir", imported])
            rss_export = peak_rss_bytes(["export-t5x", "--checkpoint_dir", imported, "--output_dir", exported])
            result[name] = {**sizes, "import_peak_rss_bytes": rss_import, "export_peak_rss_bytes": rss_export}
    for command in ("import", "export"):
        extra = result["model"][f"{command}_peak_rss_bytes"] - result["baseline"][f"{command}_peak_rss_bytes"]
        result[f"{command}_rss_above_baseline_bytes"] = extra
        result[f"{command}_rss_above_baseline_in_largest_arrays"] = round(extra / result["model"]["largest_array_bytes"], 2)
        result[f"{command}_rss_above_baseline_in_params"] = round(extra / result["model"]["params_bytes"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
