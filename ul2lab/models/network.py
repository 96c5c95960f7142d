"""The T5 / UL2 encoder-decoder, laid out and named as t5x's `examples/t5/network.py`.

Pre-norm layers, RMS layer norms, no dense biases, one relative position bias
table per stack. Parameter paths (e.g. `encoder/layers_0/attention/query/kernel`)
are t5x's, so checkpoints and partitioning rules carry over.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ul2lab.models.config import T5Config
from ul2lab.models.layers import (DenseGeneral, Embed, LayerNorm, MlpBlock, MultiHeadDotProductAttention,
                                  RelativePositionBiases, SegmentMask, combine_masks, make_attention_mask,
                                  segment_ids_for_mask)

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


def _maybe_remat(layer_cls, policy_name: str, scanned: bool = False):
    """Wrap a layer in nn.remat; flags live on the module (not call args) so nothing static is traced."""
    if policy_name == "none":
        return layer_cls
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    # inside a scan the loop boundary already stops XLA from merging recomputation away (CSE)
    return nn.remat(layer_cls, policy=policy, prevent_cse=not scanned)


def _layer_stack(layer_cls, cfg: T5Config, num_layers: int, num_inputs: int):
    """`layer_cls` (remat applied inside) scanned num_layers times: one compiled layer body, params
    stacked on a leading 'layers' axis as t5x's scan_layers (named `layers`, not `layers_<i>`)."""
    return nn.scan(_maybe_remat(layer_cls, cfg.remat_policy, scanned=True),
                   variable_axes={"params": 0, "cache": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * num_inputs, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    scanned: bool = False  # inside nn.scan: return (carry, per-layer output) as scan expects

    @nn.compact
    def __call__(self, x, mask, bias):
        cfg = self.config
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = _attention(cfg, "attention")(h, h, mask, bias, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        h = _norm(cfg, "pre_mlp_layer_norm")(x)
        h = _mlp(cfg)(h, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, _EMBED_AXES)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    decode: bool = False
    scanned: bool = False

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
        y = nn.with_logical_constraint(y, _EMBED_AXES)
        return (y, None) if self.scanned else y


def _swap_batch_and_layers(cache):
    # (layers, batch, ...) <-> (batch, layers, ...); the per-layer cache_index (layers,) stays
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1) if x.ndim > 1 else x, cache)


def _relpos_bias(cfg: T5Config, mask, length: int, bidirectional: bool):
    """The stack's bias for its self-attention: dense (1, heads, q, k) for a dense mask, the
    (heads, 2 * length - 1) offset bias the fused kernel expands in-kernel for a SegmentMask."""
    relpos = RelativePositionBiases(num_buckets=cfg.relative_attention_num_buckets,
                                    max_distance=cfg.relative_attention_max_distance,
                                    num_heads=cfg.num_heads, dtype=cfg.compute_dtype, name="relpos_bias")
    if isinstance(mask, SegmentMask):
        return relpos.offset_bias(length, length, bidirectional)
    return relpos(length, length, bidirectional)


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
        bias = _relpos_bias(cfg, encoder_mask, length, bidirectional=True)
        if cfg.scan_layers:
            x, _ = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, 2)(
                cfg, deterministic=deterministic, scanned=True, name="layers")(x, encoder_mask, bias)
        else:
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
        bias = _relpos_bias(cfg, decoder_mask, length, bidirectional=False)
        if cfg.scan_layers:
            stack = _layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, 4)
            if decode:
                # the scan stacks each layer's key/value cache on axis 0; stored batch-first instead,
                # so beam search reorders cache rows (axis 0) the same way as for unrolled layers
                stack = nn.map_variables(stack, "cache", trans_in_fn=_swap_batch_and_layers,
                                         trans_out_fn=_swap_batch_and_layers, mutable=True)
            y, _ = stack(cfg, deterministic=deterministic, decode=decode, scanned=True, name="layers")(
                y, encoded, decoder_mask, encoder_decoder_mask, bias)
        else:
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
    0 for padding); attention never crosses segments. With attention_impl="pallas" the masks
    are SegmentMasks (ids per position) for the fused kernel, except while decoding with the
    key/value cache, which always takes the reference path.
    """
    config: T5Config

    @property
    def _segment_masks(self) -> bool:
        return self.config.attention_impl == "pallas"

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.compute_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout: bool = False):
        valid = encoder_input_tokens > 0
        if self._segment_masks:
            ids = segment_ids_for_mask(valid, encoder_segment_ids)
            return self.encoder(encoder_input_tokens, SegmentMask(ids, ids),
                                enable_dropout=enable_dropout)
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
        if self._segment_masks and not decode:
            if (encoder_segment_ids is None) != (decoder_segment_ids is None):
                raise ValueError("pass both encoder_segment_ids and decoder_segment_ids (packed "
                                 "examples) or neither")
            target_ids = segment_ids_for_mask(decoder_target_tokens > 0, decoder_segment_ids)
            return self.decoder(encoded, decoder_input_tokens, SegmentMask(target_ids, target_ids, causal=True),
                                SegmentMask(target_ids, segment_ids_for_mask(encoder_valid, encoder_segment_ids)),
                                enable_dropout=enable_dropout)
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


# ---------------------------------------------------------------------------------------------
# Converting params between unrolled (`layers_0`, `layers_1`, ...) and scanned (`layers`, stacked
# on axis 0) layouts, for checkpoints and Hugging Face import/export of scan_layers models.

_STACKS = ("encoder", "decoder")


def is_stacked(params) -> bool:
    """True if the params tree has scanned layers (`encoder/layers`)."""
    return "layers" in params.get("encoder", {})


def stack_layers(params):
    """Unrolled params -> scan_layers params: each stack's `layers_<i>` stacked into `layers`."""
    out = dict(params)
    for stack in _STACKS:
        sub = dict(params[stack])
        names = sorted((k for k in sub if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        if [int(k.split("_")[1]) for k in names] != list(range(len(names))) or not names:
            raise ValueError(f"params/{stack} has layers {names}; expected layers_0 ... layers_<n-1> "
                             "(are they already stacked?)")
        layers = [sub.pop(k) for k in names]
        # numpy stays numpy (checkpoint and Hugging Face conversion run on the host)
        sub["layers"] = jax.tree_util.tree_map(
            lambda *xs: (np.stack if isinstance(xs[0], np.ndarray) else jnp.stack)(xs), *layers)
        out[stack] = sub
    return out


def unstack_layers(params):
    """scan_layers params -> unrolled params (`layers_<i>`, as t5x and Hugging Face number them)."""
    out = dict(params)
    for stack in _STACKS:
        sub = dict(params[stack])
        if "layers" not in sub:
            raise ValueError(f"params/{stack} has no stacked 'layers' (are they already unrolled?)")
        layers = sub.pop("layers")
        count = jax.tree_util.tree_leaves(layers)[0].shape[0]
        for i in range(count):
            sub[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
        out[stack] = sub
    return out
