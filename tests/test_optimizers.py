"""Optimizers against independent numpy implementations of t5x Adafactor and nanoT5 AdamWScale."""
import jax
import numpy as np
import pytest

from ul2lab.train import optimizers, schedules


def param_tree(rng):
    return {"encoder": {"kernel": rng.normal(0, 0.05, (128, 160)).astype(np.float32),   # factored
                        "wide": rng.normal(0, 2.0, (6, 130)).astype(np.float32),        # 6 < 128: not
                        # attention kernels [embed, heads, kv] and out [heads, kv, embed]
                        "query": {"kernel": rng.normal(0, 0.1, (128, 4, 40)).astype(np.float32)},
                        "out": {"kernel": rng.normal(0, 0.1, (4, 40, 128)).astype(np.float32)}},
            "scale": (1.0 + 0.1 * rng.normal(size=(96,))).astype(np.float32),
            "tiny": np.full((3, 4), 1e-5, np.float32)}                                  # RMS < 1e-3


def grad_trees(rng, params, steps):
    return [jax.tree_util.tree_map(lambda p: rng.normal(0, 0.3, p.shape).astype(np.float32), params)
            for _ in range(steps)]


def rms(x):
    return np.sqrt(np.mean(np.square(x)))


def numpy_adafactor(params, grads_per_step, lrs, decay_exponent=0.8, eps1=1e-30, eps2=1e-3,
                    clip=1.0, min_dim_size_to_factor=128):
    """t5x Adafactor (no momentum), written from the paper's Algorithm 4 + t5x's defaults."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.asarray(p, np.float64) for p in leaves]
    stats = [None] * len(leaves)
    all_updates = []
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for step, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        beta2 = 1.0 - step ** -decay_exponent  # 0 at step 1: the first estimate is g^2 itself
        updates = []
        for i, (p, g) in enumerate(zip(leaves, jax.tree_util.tree_leaves(grads))):
            g = np.asarray(g, np.float64)
            g2 = g * g + eps1
            if g.ndim == 3:  # t5x's factor rules: rows = embed, columns = (heads, kv)
                rows, cols = ((2,), (0, 1)) if "'out'" in paths[i] else ((0,), (1, 2))
                r, c = stats[i] if stats[i] is not None else (0.0, 0.0)
                r = beta2 * r + (1 - beta2) * g2.mean(axis=cols, keepdims=True)
                c = beta2 * c + (1 - beta2) * g2.mean(axis=rows, keepdims=True)
                stats[i] = (r, c)
                v = r * c / r.mean()
            elif g.ndim == 2 and min(g.shape) >= min_dim_size_to_factor:
                r, c = stats[i] if stats[i] is not None else (0.0, 0.0)
                r = beta2 * r + (1 - beta2) * g2.mean(axis=1)
                c = beta2 * c + (1 - beta2) * g2.mean(axis=0)
                stats[i] = (r, c)
                v = np.outer(r, c) / r.mean()
            else:
                v = beta2 * (stats[i] if stats[i] is not None else 0.0) + (1 - beta2) * g2
                stats[i] = v
            u = g / np.sqrt(v)
            u = u / max(1.0, rms(u) / clip)
            updates.append(-lr * max(eps2, rms(p)) * u)
        leaves = [p + u for p, u in zip(leaves, updates)]
        all_updates.append(jax.tree_util.tree_unflatten(treedef, updates))
    return all_updates


def run_optax(tx, params, grads_per_step):
    state = tx.init(params)
    out = []
    for grads in grads_per_step:
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        out.append(updates)
    return out


def assert_trees_close(a, b, rtol, atol=0.0):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


def test_adafactor_matches_numpy_t5x_adafactor():
    rng = np.random.default_rng(0)
    params = param_tree(rng)
    grads = grad_trees(rng, params, 3)
    schedule = schedules.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=2)
    tx = optimizers.make_optimizer("adafactor", schedule)
    got = run_optax(tx, params, grads)
    want = numpy_adafactor(params, grads, [float(schedule(s)) for s in range(3)])
    assert_trees_close(got, want, rtol=2e-4, atol=1e-9)
    # the factored matrix is clipped at step 1 (its raw update has RMS > 1); the tiny tensor's
    # step uses the 1e-3 floor, not its own 1e-5 RMS
    k = np.asarray(got[0]["encoder"]["kernel"])
    np.testing.assert_allclose(rms(k), float(schedule(0)) * rms(params["encoder"]["kernel"]), rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(got[0]["tiny"])), float(schedule(0)) * 1e-3, rtol=1e-4)
    # factored state: a row and a column vector per matrix, including the attention kernels
    state = tx.init(params)
    sizes = sorted(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim == 1 and x.size > 1)
    assert sizes.count(128) == 3 and sizes.count(160) == 3


def test_adafactor_second_step_uses_decay_rate_0_8():
    rng = np.random.default_rng(1)
    params = {"v": rng.normal(size=(5,)).astype(np.float32)}
    g1, g2 = np.full((5,), 1.0, np.float32), np.full((5,), 3.0, np.float32)
    tx = optimizers.adafactor(1.0, clipping_threshold=None, multiply_by_parameter_scale=False)
    u2 = run_optax(tx, params, [{"v": g1}, {"v": g2}])[1]["v"]
    beta2 = 1 - 2 ** -0.8                       # 0.4257...
    v = beta2 * 1.0 + (1 - beta2) * 9.0         # hand-checkable: g1^2 = 1, g2^2 = 9
    np.testing.assert_allclose(np.asarray(u2), -3.0 / np.sqrt(v), rtol=1e-6)


def numpy_adamw_scale(params, grads_per_step, lr, b1, b2, eps, wd, min_scale=1e-3):
    """nanoT5's AdamWScale (bias-corrected Adam; step size times max(1e-3, RMS(param)))."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.asarray(p, np.float64) for p in leaves]
    m = [np.zeros_like(p) for p in leaves]
    v = [np.zeros_like(p) for p in leaves]
    all_updates = []
    for t, grads in enumerate(grads_per_step, start=1):
        updates = []
        for i, (p, g) in enumerate(zip(leaves, jax.tree_util.tree_leaves(grads))):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            adam = (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
            decay = wd * p if p.ndim >= 2 else 0.0
            updates.append(-lr * (max(min_scale, rms(p)) * adam + decay))
        leaves = [p + u for p, u in zip(leaves, updates)]
        all_updates.append(jax.tree_util.tree_unflatten(treedef, updates))
    return all_updates


def test_adamw_rms_scaling_matches_nanot5_adamwscale():
    rng = np.random.default_rng(2)
    params = param_tree(rng)
    grads = grad_trees(rng, params, 3)
    kw = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01)
    got = run_optax(optimizers.make_optimizer("adamw", 0.02, rms_scaling=True, **kw), params, grads)
    want = numpy_adamw_scale(params, grads, 0.02, kw["b1"], kw["b2"], kw["eps"], kw["weight_decay"])
    assert_trees_close(got, want, rtol=1e-4, atol=1e-7)  # steps are ~1e-2; float32 noise near g=0
    # without weight decay, the scaled step is exactly the plain AdamW step times the tensor's RMS
    scaled = run_optax(optimizers.adamw(0.02, rms_scaling=True), params, grads[:1])[0]
    plain = run_optax(optimizers.adamw(0.02), params, grads[:1])[0]
    for name, p in [("scale", params["scale"]), ("tiny", params["tiny"])]:
        np.testing.assert_allclose(np.asarray(scaled[name]),
                                   np.asarray(plain[name]) * max(1e-3, rms(p)), rtol=1e-5)


def test_grad_clip_norm_clips_global_norm_first():
    params = {"a": np.ones((4,), np.float32), "b": np.ones((2, 2), np.float32)}
    grads = {"a": np.full((4,), 30.0, np.float32), "b": np.full((2, 2), 40.0, np.float32)}
    norm = np.sqrt(4 * 30.0 ** 2 + 4 * 40.0 ** 2)  # 100
    # eps=1 makes Adam's first step depend on the gradient's scale, so clipping is visible
    clipped = run_optax(optimizers.make_optimizer("adamw", 0.1, grad_clip_norm=1.0, eps=1.0), params, [grads])
    manual = run_optax(optimizers.make_optimizer("adamw", 0.1, eps=1.0), params,
                       [jax.tree_util.tree_map(lambda g: g / norm, grads)])
    assert_trees_close(clipped, manual, rtol=1e-6)
    unclipped = run_optax(optimizers.make_optimizer("adamw", 0.1, eps=1.0), params, [grads])
    assert not np.allclose(np.asarray(unclipped[0]["a"]), np.asarray(clipped[0]["a"]))


def test_make_optimizer_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; choose one of \['adafactor', 'adamw'\]"):
        optimizers.make_optimizer("adam", 1e-3)
    with pytest.raises(ValueError, match="has no argument.*decay_rte"):
        optimizers.make_optimizer("adafactor", 1e-3, decay_rte=0.8)
    with pytest.raises(ValueError, match="grad_clip_norm must be positive"):
        optimizers.make_optimizer("adamw", 1e-3, grad_clip_norm=0.0)
