"""Decoding on the key/value cache (flax 'cache' collection), as t5x's decoding.py:
greedy, temperature / top-k / top-p sampling (temperature 0 is greedy), beam search, and scoring.

The encoder runs once; each step feeds one token through the decoder with decode=True, which
appends its keys/values to the cache and attends to the prefix. Every loop is a lax.while_loop,
so a whole decode is one jitted program that stops as soon as every row is finished.

The search loops are written against one function, `step_fn(tokens [n, 1], cache) -> (logits
[n, vocab], cache)` (`decoder_step_fn` binds it to the Transformer), so they can be tested on any
toy model. Conventions (as t5x and Hugging Face): the decoder starts from DECODER_START_ID (0),
rows emit padding (0) after their EOS, scores are the model's natural-log likelihood of the
returned tokens (EOS included). Padding is not masked out of the search.

Imports only jax.
"""
import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from ul2lab.models.config import T5Config
from ul2lab.models.loss import cross_entropy_with_logits
from ul2lab.models.network import Transformer
from ul2lab.models.special_ids import DECODER_START_ID, EOS_ID

# ---------------------------------------------------------------------------- the cache

def init_cache(config: T5Config, params, encoder_input_tokens, max_decode_length: int):
    """Zeroed cache for `max_decode_length` steps (shapes from an abstract decode=True pass)."""
    model = Transformer(config)
    targets = jnp.ones((encoder_input_tokens.shape[0], max_decode_length), jnp.int32)
    _, variables = jax.eval_shape(functools.partial(
        model.apply, decode=True, max_decode_length=max_decode_length, mutable=["cache"]),
        {"params": params}, encoder_input_tokens, targets, targets)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def decoder_step_fn(config: T5Config, params, encoded, encoder_input_tokens, max_decode_length: int):
    """One cached decoder step: (tokens [n, 1], cache) -> (logits [n, vocab], cache), shared by
    every search below."""
    model = Transformer(config)

    def step_fn(tokens, cache):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens, tokens,
            decode=True, max_decode_length=max_decode_length, mutable=["cache"], method=Transformer.decode)
        return logits[:, -1], variables["cache"]
    return step_fn


NEG_INF = -1.0e9  # finite, so that sums of masked scores never give nan (inf - inf)
StepFn = Callable[[jax.Array, object], Tuple[jax.Array, object]]


# ---------------------------------------------------------------------------- filters and scores

def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the top_k largest logits per row (0: keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most-likely tokens whose probability is >= top_p."""
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs    # probability of the better tokens
    keep_sorted = mass_before < top_p                   # the token that crosses top_p is kept
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep | (top_p >= 1.0), logits, NEG_INF)  # top_p may be traced


def brevity_penalty(alpha: float, length) -> jax.Array:
    """t5x / GNMT length penalty ((5 + length) / 6) ** alpha; beam scores are log-prob / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ---------------------------------------------------------------------------- search loops

def temperature_sample(step_fn: StepFn, cache, batch_size: int, max_decode_length: int,
                       rng: Optional[jax.Array] = None, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, eos_id: int = EOS_ID,
                       decoder_start_token_id: int = DECODER_START_ID) -> Tuple[jax.Array, jax.Array]:
    """(tokens [batch, max_decode_length], log-likelihood [batch]), as t5x's temperature_sample.

    temperature 0 is greedy (argmax; rng not needed); temperature > 0 samples from
    softmax(top-k/top-p filtered logits / temperature). The score is under the unfiltered model.
    """
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    rng = jax.random.PRNGKey(0) if rng is None else rng  # unused at temperature 0
    # temperature may be traced (one compiled program for every value): greedy is chosen in-graph
    greedy = jnp.asarray(temperature) <= 0
    safe_temperature = jnp.where(greedy, 1.0, temperature)

    def not_finished(state):
        step, _, _, _, _, done, _ = state
        return (step < max_decode_length) & ~jnp.all(done)

    def body(state):
        step, token, cache, out, log_lik, done, rng = state
        logits, cache = step_fn(token[:, None], cache)
        logits = logits.astype(jnp.float32)
        rng, key = jax.random.split(rng)
        # cond, not where: greedy decoding does not pay for the sort of the top-p filter
        token = jax.lax.cond(
            greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
            lambda: jax.random.categorical(
                key, top_p_filter(top_k_filter(logits / safe_temperature, top_k), top_p)).astype(jnp.int32))
        token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, 0, token)  # finished rows emit padding
        log_lik = log_lik + jnp.where(done, 0.0, token_log_prob)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, token, cache, out, log_lik, done | (token == eos_id), rng

    state = (jnp.array(0, jnp.int32), jnp.full((batch_size,), decoder_start_token_id, jnp.int32), cache,
             jnp.zeros((batch_size, max_decode_length), jnp.int32), jnp.zeros((batch_size,), jnp.float32),
             jnp.zeros((batch_size,), bool), rng)
    _, _, _, out, log_lik, _, _ = jax.lax.while_loop(not_finished, body, state)
    return out, log_lik


def _gather_beams(tree, beam_indices, batch_size: int, beam_size: int):
    """Pick beams [batch, n] (indices into beam_size) from every [batch*beam_size, ...] leaf."""
    flat = (beam_indices + jnp.arange(batch_size)[:, None] * beam_size).reshape(-1)

    def gather(x):
        if x.ndim == 0 or x.shape[0] != batch_size * beam_size:
            return x  # the cache index is shared by all rows
        return x[flat]
    return jax.tree_util.tree_map(gather, tree)


def beam_search(step_fn: StepFn, cache, batch_size: int, beam_size: int, max_decode_length: int,
                alpha: float = 0.6, eos_id: int = EOS_ID) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Beam search with t5x's length penalty. `cache` rows are batch-major: row b*beam_size + k.

    Returns (tokens [batch, beam, length], scores [batch, beam] = log-prob / brevity_penalty,
    log-probs [batch, beam]), best first. A candidate ends at EOS when it ranks among the top
    beam_size candidates of its step (as Hugging Face), and every live beam ends at
    max_decode_length; so beam_size 1 with alpha 0 is exactly greedy decoding.
    """
    B, K, L = batch_size, beam_size, max_decode_length

    def not_finished(state):
        step, _, live_log_prob, _, fin_scores, _, _ = state
        # log-probs only fall as beams grow, and the penalty (alpha >= 0) is largest at length L
        best_possible_live = live_log_prob[:, 0] / brevity_penalty(alpha, L)
        can_improve = best_possible_live > fin_scores[:, -1]
        return (step < L) & jnp.any(can_improve)

    def body(state):
        step, live_seqs, live_log_prob, fin_seqs, fin_scores, fin_log_prob, cache = state
        last = jnp.where(step > 0, live_seqs[:, :, jnp.maximum(step - 1, 0)], 0).reshape(-1, 1)
        logits, cache = step_fn(last, cache)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(B, K, vocab)
        candidates = (live_log_prob[:, :, None] + log_probs).reshape(B, K * vocab)
        n = min(2 * K, K * vocab)  # enough for K live beams even if K candidates end at EOS
        cand_log_prob, cand_index = jax.lax.top_k(candidates, n)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(live_seqs, cand_beam[:, :, None], axis=1)
        cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_token[:, :, None], (0, 0, step))

        # finished: EOS among the top K candidates, or anything in the top K at the last step
        in_top_k = jnp.arange(n)[None, :] < K
        ends = in_top_k & ((cand_token == eos_id) | (step == L - 1))
        cand_scores = jnp.where(ends, cand_log_prob / brevity_penalty(alpha, step + 1), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, cand_scores], axis=1)
        fin_scores, keep = jax.lax.top_k(all_scores, K)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, cand_seqs], axis=1), keep[:, :, None], axis=1)
        fin_log_prob = jnp.take_along_axis(jnp.concatenate([fin_log_prob, cand_log_prob], axis=1), keep, axis=1)

        # live: the best K candidates that did not end
        live_scores = jnp.where(cand_token == eos_id, NEG_INF, cand_log_prob)
        live_log_prob, keep = jax.lax.top_k(live_scores, K)
        live_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
        cache = _gather_beams(cache, jnp.take_along_axis(cand_beam, keep, axis=1), B, K)
        return step + 1, live_seqs, live_log_prob, fin_seqs, fin_scores, fin_log_prob, cache

    # one live hypothesis per example at the start: the other beams are copies that must not win
    live_log_prob = jnp.tile(jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1))
    state = (jnp.array(0, jnp.int32), jnp.zeros((B, K, L), jnp.int32), live_log_prob,
             jnp.zeros((B, K, L), jnp.int32), jnp.full((B, K), NEG_INF, jnp.float32),
             jnp.full((B, K), NEG_INF, jnp.float32), cache)
    _, _, _, fin_seqs, fin_scores, fin_log_prob, _ = jax.lax.while_loop(not_finished, body, state)
    return fin_seqs, fin_scores, fin_log_prob


# ---------------------------------------------------------------------------- the Transformer

@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "beam_size", "eos_id"))
def beam_search_predict(params, config: T5Config, encoder_input_tokens, max_decode_length: int,
                        beam_size: int = 4, alpha: float = 0.6, eos_id: int = EOS_ID):
    """(tokens [batch, beam, length], length-penalized scores, log-likelihoods), best beam first."""
    batch = encoder_input_tokens.shape[0]
    inputs = jnp.repeat(encoder_input_tokens, beam_size, axis=0)   # row b*beam_size + k
    encoded = Transformer(config).apply({"params": params}, inputs, method=Transformer.encode)
    cache = init_cache(config, params, inputs, max_decode_length)
    step_fn = decoder_step_fn(config, params, encoded, inputs, max_decode_length)
    return beam_search(step_fn, cache, batch, beam_size, max_decode_length, alpha, eos_id)


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "top_k", "eos_id"))
def sample_predict(params, config: T5Config, encoder_input_tokens, max_decode_length: int, rng=None,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID):
    """(tokens [batch, length], log-likelihood [batch]): greedy at temperature 0, else sampled with
    temperature / top-k / top-p."""
    encoded = Transformer(config).apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
    cache = init_cache(config, params, encoder_input_tokens, max_decode_length)
    step_fn = decoder_step_fn(config, params, encoded, encoder_input_tokens, max_decode_length)
    return temperature_sample(step_fn, cache, encoder_input_tokens.shape[0], max_decode_length, rng,
                              temperature, top_k, top_p, eos_id)


def greedy_decode(params, config: T5Config, encoder_input_tokens, max_decode_length: int,
                  eos_id: int = EOS_ID):
    """Greedy tokens [batch, max_decode_length] after the start token; 0 (padding) after EOS.

    Same output as Hugging Face `generate(do_sample=False)` minus its leading start token.
    """
    return sample_predict(params, config, encoder_input_tokens, max_decode_length, None, 0.0, eos_id=eos_id)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def score(params, config: T5Config, encoder_input_tokens, decoder_target_tokens) -> jax.Array:
    """Log-likelihood [batch] of each row's targets (tokens > 0, EOS included), teacher-forced."""
    decoder_input_tokens = jnp.pad(decoder_target_tokens[:, :-1], ((0, 0), (1, 0)), constant_values=DECODER_START_ID)
    logits = Transformer(config).apply({"params": params}, encoder_input_tokens, decoder_input_tokens,
                                       decoder_target_tokens)
    onehot = jax.nn.one_hot(decoder_target_tokens, logits.shape[-1])
    token_log_prob = -cross_entropy_with_logits(logits, onehot, z_loss=0.0)[0]
    return jnp.sum(jnp.where(decoder_target_tokens > 0, token_log_prob, 0.0), axis=-1)


# The one statement of which decoding settings work: (field, test, what to use instead). predict()
# raises on them; ul2lab.runs.settings reports them with the flag and gin names a user typed.
DECODE_SETTING_RULES = (
    ("max_decode_length", lambda v: v >= 1, "a positive number"),
    ("beam_size", lambda v: v >= 1, "1 (greedy) or more"),
    ("alpha", lambda v: v >= 0, "0 (no length penalty) or a positive number"),
    ("temperature", lambda v: v >= 0, "0 (greedy) or a positive number"),
    ("top_k", lambda v: v >= 0, "0 (all tokens) or a positive number"),
    ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"))


def decode_settings_problem(**settings) -> Optional[Tuple[Tuple[str, ...], str]]:
    """(the fields at fault, what is wrong) for the first decoding setting that cannot work, or None.
    Fields not given are not checked; each rule names its fix."""
    for field, ok, fix in DECODE_SETTING_RULES:
        if field not in settings:
            continue
        value = settings[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return (field,), f"is {value!r} ({type(value).__name__}); use a number: {fix}"
        if not ok(value):
            return (field,), f"{value!r} is invalid; use {fix}"
    beam_size, temperature = settings.get("beam_size", 1), settings.get("temperature", 0)
    if beam_size > 1 and temperature > 0:
        return ("beam_size", "temperature"), ("both ask for a decoding method (beam search when > 1, sampling "
                                              "when > 0): choose beam search or sampling")
    if (settings.get("top_k", 0) or settings.get("top_p", 1) < 1) and temperature == 0:
        return ("top_k", "top_p"), "only apply to sampling; also set temperature (e.g. 1.0)"
    return None


def predict(params, config: T5Config, encoder_input_tokens, max_decode_length: int, *, beam_size: int = 1,
            alpha: float = 0.6, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            rng: Optional[jax.Array] = None, eos_id: int = EOS_ID) -> Tuple[jax.Array, jax.Array]:
    """(tokens [batch, max_decode_length], log-likelihood [batch]) by the chosen method:
    beam search when beam_size > 1, sampling when temperature > 0, greedy otherwise."""
    problem = decode_settings_problem(max_decode_length=max_decode_length, beam_size=beam_size, alpha=alpha,
                                      temperature=temperature, top_k=top_k, top_p=top_p)
    if problem:
        raise ValueError(f"{' / '.join(problem[0])} {problem[1]}")
    if beam_size > 1:
        tokens, _, log_lik = beam_search_predict(params, config, encoder_input_tokens, max_decode_length,
                                                 beam_size, alpha, eos_id)
        return tokens[:, 0], log_lik[:, 0]
    if temperature > 0 and rng is None:
        rng = jax.random.PRNGKey(0)
    return sample_predict(params, config, encoder_input_tokens, max_decode_length, rng,
                          temperature, top_k, top_p, eos_id)
