"""Cached greedy decoding equals recomputing the whole decoder at every step."""
import jax
import jax.numpy as jnp
import numpy as np

from ul2lab.models.config import T5Config
from ul2lab.models.decoding import greedy_decode
from ul2lab.models.network import Transformer, init_params

MAX_LEN = 10


def uncached_greedy(cfg, params, encoder_tokens, max_len):
    """Reference: run the full (non-cached) forward on the prefix and take the argmax at each step."""
    batch = encoder_tokens.shape[0]
    forward = jax.jit(Transformer(cfg).apply)
    decoder_inputs = np.zeros((batch, max_len), np.int32)
    for step in range(max_len - 1):
        logits = forward({"params": params}, encoder_tokens, decoder_inputs, np.ones_like(decoder_inputs))
        decoder_inputs[:, step + 1] = np.asarray(logits)[:, step].argmax(-1)
    logits = forward({"params": params}, encoder_tokens, decoder_inputs, np.ones_like(decoder_inputs))
    return np.concatenate([decoder_inputs[:, 1:], np.asarray(logits)[:, -1:].argmax(-1)], axis=1)


def stop_at_eos(tokens, eos_id):
    """What a decoder that stops at EOS returns: everything after a row's first EOS is padding."""
    out = tokens.copy()
    for row in out:
        hits = np.flatnonzero(row == eos_id)
        if hits.size:
            row[hits[0] + 1:] = 0
    return out


def test_cached_greedy_equals_uncached_and_pads_after_eos():
    # unequal depths: the decode path must not assume them equal
    cfg = T5Config(vocab_size=48, emb_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=1,
                   head_dim=8, mlp_dim=48, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   dtype="float32")
    params = init_params(cfg, jax.random.PRNGKey(0))
    encoder_tokens = np.random.RandomState(0).randint(2, 48, (3, 7)).astype(np.int32)
    encoder_tokens[1, 4:] = 0  # a padded row

    no_eos = uncached_greedy(cfg, params, encoder_tokens, MAX_LEN)
    assert len(set(no_eos.ravel())) > 3  # the random model is not degenerate
    np.testing.assert_array_equal(greedy_decode(params, cfg, jnp.asarray(encoder_tokens), MAX_LEN, eos_id=-1),
                                  no_eos)
    # as EOS pick a token row 0 emits mid-way, so stopping and padding are exercised
    eos_id = int(no_eos[0, 3])
    got = np.asarray(greedy_decode(params, cfg, jnp.asarray(encoder_tokens), MAX_LEN, eos_id=eos_id))
    np.testing.assert_array_equal(got, stop_at_eos(no_eos, eos_id))
    assert (got[0, 4:] == 0).all()
