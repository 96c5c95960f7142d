"""Greedy decoding with a key/value cache (flax 'cache' collection, as t5x).

The encoder runs once; each step feeds one token through the decoder with
decode=True, which appends its keys/values to the cache and attends to the
prefix. The loop is a lax.while_loop, so the whole decode is one jitted program
that stops as soon as every row has produced EOS.
"""
import functools

import jax
import jax.numpy as jnp

from ul2lab.models.config import T5Config
from ul2lab.models.network import Transformer


def init_cache(config: T5Config, params, encoder_input_tokens, max_decode_length: int):
    """Zeroed cache for `max_decode_length` steps (shapes from an abstract decode=True pass)."""
    model = Transformer(config)
    targets = jnp.ones((encoder_input_tokens.shape[0], max_decode_length), jnp.int32)
    _, variables = jax.eval_shape(functools.partial(
        model.apply, decode=True, max_decode_length=max_decode_length, mutable=["cache"]),
        {"params": params}, encoder_input_tokens, targets, targets)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def decoder_step_fn(config: T5Config, params, encoded, encoder_input_tokens, max_decode_length: int):
    """One cached decoder step: (tokens [n, 1], cache) -> (logits [n, vocab], cache).

    Shared by greedy decoding here and beam search / sampling in ul2lab.inference.
    """
    model = Transformer(config)

    def step_fn(tokens, cache):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens, tokens,
            decode=True, max_decode_length=max_decode_length, mutable=["cache"], method=Transformer.decode)
        return logits[:, -1], variables["cache"]
    return step_fn


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length"))
def greedy_decode(params, config: T5Config, encoder_input_tokens, max_decode_length: int,
                  eos_id: int = 1, decoder_start_token_id: int = 0):
    """Greedy tokens [batch, max_decode_length] after the start token; 0 (padding) after EOS.

    Same output as Hugging Face `generate(do_sample=False)` minus its leading start token.
    """
    model = Transformer(config)
    batch = encoder_input_tokens.shape[0]
    encoded = model.apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
    cache = init_cache(config, params, encoder_input_tokens, max_decode_length)
    step_fn = decoder_step_fn(config, params, encoded, encoder_input_tokens, max_decode_length)

    def not_finished(state):
        step, _, _, _, done = state
        return jnp.logical_and(step < max_decode_length, jnp.logical_not(jnp.all(done)))

    def decode_step(state):
        step, token, cache, output, done = state
        logits, cache = step_fn(token[:, None], cache)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, 0, next_token)  # finished rows emit padding
        output = jax.lax.dynamic_update_slice(output, next_token[:, None], (0, step))
        return step + 1, next_token, cache, output, done | (next_token == eos_id)

    state = (jnp.array(0, jnp.int32), jnp.full((batch,), decoder_start_token_id, jnp.int32), cache,
             jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool))
    return jax.lax.while_loop(not_finished, decode_step, state)[3]
