"""The T5 / UL2 encoder-decoder, laid out and named as t5x's `examples/t5/network.py`.

Pre-norm layers, RMS layer norms, no dense biases, one relative position bias
table per stack. Parameter paths (e.g. `encoder/layers_0/attention/query/kernel`)
are t5x's, so checkpoints and partitioning rules carry over.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from ul2lab.models.config import T5Config
from ul2lab.models.layers import (DenseGeneral, Embed, LayerNorm, MlpBlock, MultiHeadDotProductAttention,
                                  RelativePositionBiases, combine_masks, make_attention_mask)

_EMBED_AXES = ("batch", "length", "embed")


def _dropout(cfg: T5Config):
    # t5x drops the same features at every position (broadcast over length)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))


def _attention(cfg: T5Config, name: str):
    return MultiHeadDotProductAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                        dtype=cfg.compute_dtype, dropout_rate=cfg.dropout_rate,
                                        float32_logits=cfg.float32_attention_logits,
                                        attention_impl=cfg.attention_impl, name=name)


def _norm(cfg: T5Config, name: str, use_scale: bool = True):
    return LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype, use_scale=use_scale,
                     name=name)


def _mlp(cfg: T5Config):
    return MlpBlock(mlp_dim=cfg.mlp_dim, activations=cfg.mlp_activations, dtype=cfg.compute_dtype,
                    dropout_rate=cfg.dropout_rate, name="mlp")


def _maybe_remat(layer_cls, policy_name: str):
    """Wrap a layer in nn.remat; flags live on the module (not call args) so nothing static is traced."""
    if policy_name == "none":
        return layer_cls
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    return nn.remat(layer_cls, policy=policy, prevent_cse=True)


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, bias):
        cfg = self.config
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = _attention(cfg, "attention")(h, h, mask, bias, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        h = _norm(cfg, "pre_mlp_layer_norm")(x)
        h = _mlp(cfg)(h, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, _EMBED_AXES)


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, y, encoded, self_mask, cross_mask, bias):
        cfg = self.config
        h = _norm(cfg, "pre_self_attention_layer_norm")(y)
        h = _attention(cfg, "self_attention")(h, h, self_mask, bias, deterministic=self.deterministic,
                                              decode=self.decode)
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        h = _norm(cfg, "pre_cross_attention_layer_norm")(y)
        h = _attention(cfg, "encoder_decoder_attention")(h, encoded, cross_mask,
                                                         deterministic=self.deterministic)
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        h = _norm(cfg, "pre_mlp_layer_norm")(y)
        h = _mlp(cfg)(h, deterministic=self.deterministic)
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(y, _EMBED_AXES)


def _relpos_bias(cfg: T5Config):
    return RelativePositionBiases(num_buckets=cfg.relative_attention_num_buckets,
                                  max_distance=cfg.relative_attention_max_distance,
                                  num_heads=cfg.num_heads, dtype=cfg.compute_dtype, name="relpos_bias")


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoder_input_tokens, encoder_mask, enable_dropout: bool = False):
        cfg = self.config
        deterministic = not enable_dropout
        x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
        x = _dropout(cfg)(x, deterministic=deterministic).astype(cfg.compute_dtype)
        x = nn.with_logical_constraint(x, _EMBED_AXES)
        length = encoder_input_tokens.shape[-1]
        bias = _relpos_bias(cfg)(length, length, bidirectional=True)
        layer_cls = _maybe_remat(EncoderLayer, cfg.remat_policy)
        for i in range(cfg.num_encoder_layers):
            x = layer_cls(cfg, deterministic=deterministic, name=f"layers_{i}")(x, encoder_mask, bias)
        x = _norm(cfg, "encoder_norm")(x)
        return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                 enable_dropout: bool = False, decode: bool = False, max_decode_length=None):
        cfg = self.config
        deterministic = not enable_dropout
        y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
        y = _dropout(cfg)(y, deterministic=deterministic).astype(cfg.compute_dtype)
        y = nn.with_logical_constraint(y, _EMBED_AXES)
        # while decoding one token at a time the attention takes its row of the full bias
        length = max_decode_length if decode else decoder_input_tokens.shape[-1]
        if decode and not max_decode_length:
            raise ValueError("decode=True needs max_decode_length (the length of the key/value cache)")
        bias = _relpos_bias(cfg)(length, length, bidirectional=False)
        layer_cls = _maybe_remat(DecoderLayer, cfg.remat_policy)
        for i in range(cfg.num_decoder_layers):
            y = layer_cls(cfg, deterministic=deterministic, decode=decode, name=f"layers_{i}")(
                y, encoded, decoder_mask, encoder_decoder_mask, bias)
        y = _norm(cfg, "decoder_norm", use_scale=cfg.decoder_norm_use_scale)(y)
        y = _dropout(cfg)(y, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # T5's tied head rescales by 1/sqrt(d_model) (Mesh TF / HF: before the projection)
            logits = self.shared_embedding.attend(y * (cfg.emb_dim ** -0.5))
        else:
            logits = DenseGeneral((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype,
                                  name="logits_dense")(y)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
    """T5 encoder-decoder; `__call__`, `encode` and `decode` take t5x's arguments.

    Token id 0 is padding. Packed rows pass segment ids (1, 2, ... per example,
    0 for padding); attention never crosses segments.
    """
    config: T5Config

    def __post_init__(self):
        if self.config.scan_layers:
            raise NotImplementedError("T5Config.scan_layers=True is not implemented yet; "
                                      "set scan_layers=False (layers are unrolled)")
        super().__post_init__()

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.compute_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout: bool = False):
        valid = encoder_input_tokens > 0
        mask = make_attention_mask(valid, valid)
        if encoder_segment_ids is not None:
            mask = combine_masks(mask, make_attention_mask(encoder_segment_ids, encoder_segment_ids,
                                                           jnp.equal))
        return self.encoder(encoder_input_tokens, mask, enable_dropout=enable_dropout)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
               enable_dropout: bool = False, decode: bool = False, max_decode_length=None):
        del decoder_positions  # relative biases come from in-row offsets (see RelativePositionBiases)
        encoder_valid = encoder_input_tokens > 0
        if decode:
            # one query per step; the causal/prefix mask comes from the cache index
            decoder_mask = None
            cross_mask = make_attention_mask(jnp.ones_like(decoder_target_tokens, bool), encoder_valid)
        else:
            target_valid = decoder_target_tokens > 0
            length = decoder_target_tokens.shape[-1]
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            decoder_mask = combine_masks(causal, make_attention_mask(target_valid, target_valid))
            cross_mask = make_attention_mask(target_valid, encoder_valid)
            if decoder_segment_ids is not None:
                decoder_mask = combine_masks(decoder_mask, make_attention_mask(
                    decoder_segment_ids, decoder_segment_ids, jnp.equal))
        if encoder_segment_ids is not None:
            if decode:
                raise ValueError("packed inputs (encoder_segment_ids) cannot be decoded with the "
                                 "key/value cache; decode unpacked examples")
            cross_mask = combine_masks(cross_mask, make_attention_mask(
                decoder_segment_ids, encoder_segment_ids, jnp.equal))
        return self.decoder(encoded, decoder_input_tokens, decoder_mask, cross_mask,
                            enable_dropout=enable_dropout, decode=decode,
                            max_decode_length=max_decode_length)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, *, enable_dropout: bool = False, decode: bool = False,
                 max_decode_length=None):
        """Logits [batch, target_length, vocab] in float32."""
        del encoder_positions  # see RelativePositionBiases: offsets within a row suffice
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("pass both encoder_segment_ids and decoder_segment_ids (packed "
                             "examples) or neither")
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions,
                           enable_dropout=enable_dropout, decode=decode,
                           max_decode_length=max_decode_length)


def init_params(config: T5Config, rng, batch_size: int = 1, input_length: int = 8,
                target_length: int = 8, boxed: bool = False):
    """Random t5x-style initial parameters (float32); boxed=True keeps the logical-axis boxes."""
    tokens_in = jnp.ones((batch_size, input_length), jnp.int32)
    tokens_out = jnp.ones((batch_size, target_length), jnp.int32)
    # jitted: one compile is much faster than eager op-by-op init, even on CPU
    variables = jax.jit(Transformer(config).init)(rng, tokens_in, tokens_out, tokens_out)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def abstract_params(config: T5Config):
    """Shapes/dtypes of the boxed parameter tree (no memory): feed to partitioning.params_shardings."""
    return jax.eval_shape(lambda rng: init_params(config, rng, boxed=True), jax.random.PRNGKey(0))
