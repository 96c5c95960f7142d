"""Content checksums of checkpointed arrays, and the finite check of restored ones.

orbax finalizes a step atomically, so a crash never leaves half a step; but bytes damaged later
(a bad disk, a partial copy over an existing file, an editor) restore without complaint as wrong
numbers. So every saved step carries, per array, a 64-bit digest of its content, computed from
the arrays in memory when the step is saved and stored with it; a restore recomputes the digests
of what it read and compares. A restored array that holds NaN or inf is refused as well: the train
step never applies a non-finite update, so a saved state is always finite.

The digest works on the array's bits as 32-bit words w_i (i = the flat index) and is two sums mod
2**32: sum(w_i * odd(i)) and sum(w_i ^ mix(i)). Any change of one word changes the first (odd
multipliers are invertible), moved or swapped words change it with probability 1 - 2**-32, and
random garbage passes both with probability ~2**-64. Sums are exact in any order, so the digest is
the same on one device or sharded over many, and it is computed where the arrays are, under jit.
"""
import re
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DIGEST_FORMAT = 1
_GOLDEN, _OFFSET, _MIX = 0x9E3779B1, 0x7F4A7C15, 0x85EBCA6B


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, one per element (narrower dtypes zero-extended)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None:
        raise ValueError(f"cannot checksum arrays of dtype {x.dtype} (8-byte types need jax_enable_x64)")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_summary(x):
    words = _words(x)
    index = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape)
    odd = (index * jnp.uint32(_GOLDEN) + jnp.uint32(_OFFSET)) | jnp.uint32(1)
    digest = jnp.stack([jnp.sum(words * odd, dtype=jnp.uint32),
                        jnp.sum(words ^ (index * jnp.uint32(_MIX)), dtype=jnp.uint32)])
    x = jnp.asarray(x)
    nonfinite = (jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) if jnp.issubdtype(x.dtype, jnp.inexact)
                 else jnp.zeros((), jnp.int32))
    return digest, nonfinite


_summaries = jax.jit(lambda leaves: [_leaf_summary(x) for x in leaves])


def summarize(tree: Any) -> Tuple[Dict[str, List[int]], List[str]]:
    """({array path: [digest words]}, [paths of arrays holding NaN or inf]) of a tree of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    results = jax.device_get(_summaries([leaf for _, leaf in flat]))
    digests = {p: [int(w) for w in np.asarray(d)] for p, (d, _) in zip(paths, results)}
    nonfinite = [p for p, (_, n) in zip(paths, results) if int(n)]
    return digests, nonfinite


def array_summary(array: Any) -> Tuple[List[int], bool]:
    """(digest words, holds NaN or inf) of one array: what `summarize` gives its leaf, for arrays that
    are read and written one at a time (imports and exports of models larger than host memory)."""
    digest, nonfinite = jax.device_get(_summaries([array]))[0]
    return [int(w) for w in np.asarray(digest)], bool(int(nonfinite))


def key(*names: str) -> str:
    """The checksum key of the array at nested dict keys `names` (as `summarize` names it)."""
    return "".join(f"[{name!r}]" for name in names)


def uncovered(tree: Any, saved: dict = None) -> List[str]:
    """Paths of the arrays of `tree` that `saved` (a step's checksums; None: it has none) has no digest
    for: arrays no restore can check for damage."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    arrays = saved.get("arrays", {}) if saved and saved.get("format") == DIGEST_FORMAT else {}
    return [p for p in paths if p not in arrays]


def describe(paths: List[str]) -> str:
    """A few of `paths` in plain words (params/encoder/..., "and N more arrays")."""
    return _some(paths)


def digests(tree: Any) -> dict:
    """What a checkpoint stores beside its arrays: {"format", "arrays": {path: digest}}."""
    return {"format": DIGEST_FORMAT, "arrays": summarize(tree)[0]}


def problems(tree: Any, saved: dict = None) -> List[str]:
    """Why `tree` (restored arrays, under the same top-level keys as when saved) cannot be used:
    digests that differ from `saved` (None: no checksums were saved), then non-finite arrays.
    Empty when it is fine."""
    computed, nonfinite = summarize(tree)
    found = []
    if saved and saved.get("format") == DIGEST_FORMAT:
        arrays = saved.get("arrays", {})
        changed = [p for p, d in computed.items() if p in arrays and list(arrays[p]) != d]
        if changed:
            found.append(f"the content of {_some(changed)} does not match the checksum saved with it "
                         "(the bytes changed after the step was written)")
    if nonfinite:
        found.append(f"{_some(nonfinite)} hold{'s' if len(nonfinite) == 1 else ''} NaN or inf")
    return found


_PATH_PART = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.(\w+)")  # ['key'], [index], .field of keystr


def _plain(path: str) -> str:
    """keystr's "['opt_state'][0].v_row['decoder/x']" as "opt_state/0/v_row/decoder/x"."""
    parts = ["".join(groups) for groups in _PATH_PART.findall(path)]
    return "/".join(parts) if parts else path


def _some(paths: List[str]) -> str:
    names = ", ".join(_plain(p) for p in paths[:3])
    return names + (f" and {len(paths) - 3} more arrays" if len(paths) > 3 else "")
