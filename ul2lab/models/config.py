"""The network's configuration: one frozen dataclass, presets named as t5x's gin files.

Field names follow t5x's `network.T5Config` so a t5x user reads them without a
dictionary. The config is never run state: it is built once (from a preset, gin,
or a checkpoint's config.json) and passed down.
"""
import dataclasses
import json
from typing import Any, Tuple

import jax
import jax.numpy as jnp

# names the MLP understands (ul2lab.models.layers); gelu is the tanh approximation, as T5
MLP_ACTIVATIONS = ("gelu", "silu", "swish", "relu", "linear")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    emb_dim: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    head_dim: int
    mlp_dim: int
    # ('gelu', 'linear') T5.1.1 gated-gelu; ('silu', 'linear') UL2 gated-silu; ('relu',) T5 1.0
    mlp_activations: Tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    # True: tied embedding, logits = h @ E^T scaled by 1/sqrt(emb_dim); False: decoder/logits_dense
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # UL2-20B's checkpoint has a decoder_norm with no learned scale
    decoder_norm_use_scale: bool = True
    layer_norm_epsilon: float = 1e-6
    dtype: str = "bfloat16"          # activation / compute dtype; params are always float32
    # "xla": the reference, everywhere. "pallas": the packed-T5 fused kernel (models/packed_attention:
    # bias and segment mask built in-kernel; Triton on GPU, interpreted on CPU). "cudnn":
    # jax.nn.dot_product_attention on NVIDIA GPUs, fed a (batch, heads, q, k) bias when rows are packed.
    attention_impl: str = "xla"
    float32_attention_logits: bool = False
    remat_policy: str = "none"       # "none" | "full" | a jax.checkpoint_policies name
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_encoder_layers < 1 or self.num_decoder_layers < 1:
            raise ValueError("T5Config needs at least one encoder and one decoder layer, got "
                             f"{self.num_encoder_layers} and {self.num_decoder_layers}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"T5Config.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        unknown = [a for a in self.mlp_activations if a not in MLP_ACTIVATIONS]
        if not self.mlp_activations or unknown:
            raise ValueError(f"T5Config.mlp_activations {self.mlp_activations} has unknown entries "
                             f"{unknown}; use names from {MLP_ACTIVATIONS}, e.g. ('gelu', 'linear')")
        if self.remat_policy not in ("none", "full") and not hasattr(jax.checkpoint_policies,
                                                                       self.remat_policy):
            raise ValueError(f"T5Config.remat_policy {self.remat_policy!r} is not 'none', 'full' or a "
                             "jax.checkpoint_policies name such as 'dots_with_no_batch_dims_saveable'")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_activations"] = list(self.mlp_activations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _t5_1_1(emb_dim, num_heads, num_layers, mlp_dim, head_dim=64) -> T5Config:
    return T5Config(vocab_size=32128, emb_dim=emb_dim, num_heads=num_heads,
                    num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                    head_dim=head_dim, mlp_dim=mlp_dim, mlp_activations=("gelu", "linear"),
                    dropout_rate=0.0, logits_via_embedding=False)


# Shapes from t5x's gin files (t5x/examples/t5/t5_1_1/*.gin) and the public UL2-20B checkpoint.
PRESETS = {
    "t5_1_1_small": _t5_1_1(512, 6, 8, 1024),
    "t5_1_1_base": _t5_1_1(768, 12, 12, 2048),
    "t5_1_1_large": _t5_1_1(1024, 16, 24, 2816),
    "t5_1_1_xl": _t5_1_1(2048, 32, 24, 5120),
    "t5_1_1_xxl": _t5_1_1(4096, 64, 24, 10240),
    # UL2-20B: shapes as the public google/ul2 config.json (d_model 4096, d_kv 256, 16 heads,
    # d_ff 16384, gated-silu, 32+32 layers, 32 buckets / 128 max distance). That config does not
    # untie the head, so Hugging Face runs it tied with T5's rescaling; the t5x checkpoint's
    # decoder_norm has no scale parameter.
    "ul2_20b": T5Config(vocab_size=32128, emb_dim=4096, num_heads=16, num_encoder_layers=32,
                        num_decoder_layers=32, head_dim=256, mlp_dim=16384,
                        mlp_activations=("silu", "linear"), logits_via_embedding=True,
                        decoder_norm_use_scale=False),
    # for tests and the CPU demo: seconds to compile, minutes to train
    "tiny": T5Config(vocab_size=512, emb_dim=64, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=16, mlp_dim=128,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     dtype="float32"),
}


def preset(name: str, **overrides: Any) -> T5Config:
    """A named preset, optionally with fields replaced (e.g. vocab_size=...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
