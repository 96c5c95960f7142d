"""Optimizers (optax GradientTransformations), built by name with `make_optimizer`.

    adafactor  t5x's default: factored second moments with decay rate 0.8, updates clipped to
               block RMS 1.0, step size multiplied by the parameter's RMS (at least 1e-3),
               epsilon1 1e-30, no momentum. optax.adafactor implements t5x's algorithm; these
               arguments select t5x's defaults, and 3-D attention kernels are factored as t5x's
               logical factor rules do: rows = embed, columns = (heads, kv). With scan_layers each
               layer of the stacked params is its own tensor, as in t5x's unrolled layers.
    adamw      AdamW with decoupled weight decay; rms_scaling=True gives nanoT5's AdamWScale:
               each tensor's Adam step is multiplied by max(1e-3, RMS(param)), like Adafactor's
               parameter scale, which lets T5 train with AdamW at Adafactor-like rates (~2e-2).

`learning_rate` is a float or a schedule (ul2lab.train.schedules). grad_clip_norm clips the global
gradient norm before the optimizer sees the gradients.
"""
import inspect
from typing import Any, Callable, Mapping, Optional, Union

import jax
import optax

from ul2lab.errors import UserError

LearningRate = Union[float, optax.Schedule]


def adafactor(learning_rate: LearningRate, decay_rate: float = 0.8, multiply_by_parameter_scale: bool = True,
              clipping_threshold: Optional[float] = 1.0, factored: bool = True,
              min_dim_size_to_factor: int = 128, epsilon1: float = 1e-30, momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None) -> optax.GradientTransformation:
    """Adafactor with t5x's defaults (t5x.adafactor.Adafactor with standard_logical_factor_rules).

    A matrix is factored when both its dimensions are >= min_dim_size_to_factor; an attention
    kernel when embed and heads * kv are (t5x factors those at any size: only tiny models differ).
    """
    return _layer_by_layer(_attention_kernels_as_matrices(optax.adafactor(
        learning_rate=learning_rate, decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale, clipping_threshold=clipping_threshold,
        factored=factored, min_dim_size_to_factor=min_dim_size_to_factor, eps=epsilon1,
        momentum=momentum, weight_decay_rate=weight_decay_rate)))


def _matrix_shape(path, shape) -> tuple:
    """The 2-D view t5x's factor rules give an attention kernel: (embed, heads * kv) for query/key/
    value kernels [embed, heads, kv], (heads * kv, embed) for `out` [heads, kv, embed]."""
    if len(shape) != 3:
        return shape
    if any(getattr(key, "key", None) == "out" for key in path):
        return (shape[0] * shape[1], shape[2])
    return (shape[0], shape[1] * shape[2])


def _attention_kernels_as_matrices(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` on 2-D views of the 3-D attention kernels. optax factors the two largest
    dimensions of a tensor, which for [embed, heads, kv] would be embed and kv alone (and not at
    all when kv < 128); t5x factors embed against heads and kv together. RMS-based parameter
    scale and clipping are per tensor, so the view changes nothing else."""
    def views(tree):
        return jax.tree_util.tree_map_with_path(lambda p, x: x.reshape(_matrix_shape(p, x.shape)), tree)

    def init(params):
        return inner.init(views(params))

    def update(updates, state, params=None):
        new, state = inner.update(views(updates), state, None if params is None else views(params))
        return jax.tree_util.tree_map(lambda u, g: u.reshape(g.shape), new, updates), state
    return optax.GradientTransformation(init, update)


_STACKS = ("encoder", "decoder")


def _split_stacked(tree):
    """(tree without scanned layers, {stack: {stack: {"layers": its scanned layers}}}) of a
    params-shaped tree; the second is empty for unrolled params (or any other tree)."""
    if not isinstance(tree, Mapping):
        return tree, {}
    stacked = {s: {s: {"layers": tree[s]["layers"]}} for s in _STACKS
               if isinstance(tree.get(s), Mapping) and "layers" in tree[s]}
    rest = dict(tree)
    for s in stacked:
        rest[s] = {k: v for k, v in tree[s].items() if k != "layers"}
    return rest, stacked


def _merge_stacked(rest, stacked):
    out = dict(rest)
    for s, tree in stacked.items():
        out[s] = {**rest[s], "layers": tree[s]["layers"]}
    return out


def _layer_by_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` on each layer of scan_layers params (`encoder/layers`, `decoder/layers`, stacked
    on a leading layers axis) as on its own tensor, by vmapping it over that axis: Adafactor's
    factoring, update clipping and parameter scale are per tensor, and t5x's unrolled layers are
    separate tensors. Unrolled params go straight to `inner` (the same state as without this).
    The stacked states keep the params' paths, so the trainer shards them like their params."""
    def init(params):
        rest, stacked = _split_stacked(params)
        if not stacked:
            return inner.init(params)
        return inner.init(rest), {s: jax.vmap(inner.init)(tree) for s, tree in stacked.items()}

    def update(updates, state, params=None):
        rest, stacked = _split_stacked(updates)
        if not stacked:
            return inner.update(updates, state, params)
        params_rest, params_stacked = _split_stacked(params) if params is not None else (None, {})
        rest_state, stacked_state = state
        new_rest, rest_state = inner.update(rest, rest_state, params_rest)
        new_stacked, new_stacked_state = {}, {}
        for s, tree in stacked.items():
            new_stacked[s], new_stacked_state[s] = jax.vmap(inner.update)(
                tree, stacked_state[s], params_stacked.get(s))
        return _merge_stacked(new_rest, new_stacked), (rest_state, new_stacked_state)
    return optax.GradientTransformation(init, update)


def matrices_only(params: Any) -> Any:
    """Weight-decay mask: decay kernels and embeddings (ndim >= 2), not norm scales or biases."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def adamw(learning_rate: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, rms_scaling: bool = False, min_rms_scale: float = 1e-3,
          weight_decay_mask: Optional[Callable[[Any], Any]] = matrices_only) -> optax.GradientTransformation:
    """AdamW; with rms_scaling, nanoT5's AdamWScale (step x max(min_rms_scale, RMS(param)) per tensor).

    Weight decay is decoupled and scaled by the learning rate only (not by the RMS), as in both.
    """
    if not rms_scaling:
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask)
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_param_block_rms(min_scale=min_rms_scale),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


OPTIMIZERS = {"adafactor": adafactor, "adamw": adamw}


class OptimizerError(UserError, ValueError):
    """An optimizer name or argument that does not exist (a gin binding of make_optimizer)."""


def make_optimizer(name: str, learning_rate: LearningRate, grad_clip_norm: Optional[float] = None,
                   **kwargs: Any) -> optax.GradientTransformation:
    """The optimizer called `name` ("adafactor" or "adamw"), with its keyword arguments.

    grad_clip_norm: clip gradients to this global norm first (None: no clipping).
    """
    # gin builds this inside the run (TrainConfig.optimizer = @make_optimizer): the messages name the
    # gin bindings, and OptimizerError is printed as one line before anything is written
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise OptimizerError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)} (the gin binding "
                             f"make_optimizer.name = {name!r}; e.g. make_optimizer.name = 'adafactor', or "
                             "--gin.make_optimizer.name=adamw)")
    if grad_clip_norm is not None and grad_clip_norm <= 0:
        raise OptimizerError(f"make_optimizer.grad_clip_norm must be positive (or None for no clipping), got "
                             f"{grad_clip_norm!r}")
    known = set(inspect.signature(OPTIMIZERS[name]).parameters) - {"learning_rate"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise OptimizerError(f"optimizer {name!r} has no argument(s) {unknown} (bound on make_optimizer in gin); "
                             f"its arguments are {sorted(known)}")
    optimizer = OPTIMIZERS[name](learning_rate, **kwargs)
    if grad_clip_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), optimizer)
