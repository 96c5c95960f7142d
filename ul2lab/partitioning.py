"""Device mesh, t5x's logical-axis rules, and the shardings they give params and batches.

The network names every parameter and activation dimension with a logical axis
('embed', 'heads', 'batch', ...). A rules table maps logical names to mesh axes
('data', 'fsdp', 'model'); changing parallelism means changing the table or the
mesh shape, never the model.
"""
import contextlib
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

LogicalRules = Sequence[Tuple[str, Any]]

# Dimensions t5x never shards (its `standard_logical_axis_rules` "replicated" list).
_REPLICATED_RULES = (("relpos_buckets", None), ("abspos_buckets", None), ("length", None),
                     ("layers", None), ("stack", None), ("mlp_activations", None))


def standard_logical_axis_rules() -> LogicalRules:
    """t5x's standard_logical_axis_rules() (1-D activation and parameter partitioning).

    Data parallel over 'data', Megatron-style model parallel over 'model'
    (vocab, mlp and heads split; embed replicated). Rules are tried in order and a
    mesh axis is used at most once per array.
    """
    return (("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"),
            ("heads", "model"), ("kv", None), ("joined_kv", "model")) + _REPLICATED_RULES


def fsdp_logical_axis_rules() -> LogicalRules:
    """Standard rules plus fully-sharded data parallelism over the 'fsdp' mesh axis.

    The batch splits over ('data', 'fsdp') and parameters split their 'embed'
    dimension over 'fsdp' (gathered per layer by XLA). Because 'batch' comes first,
    activations [batch, length, embed] keep embed whole: 'fsdp' is already taken.
    """
    return (("batch", ("data", "fsdp")), ("vocab", "model"), ("embed", "fsdp"), ("mlp", "model"),
            ("heads", "model"), ("kv", None), ("joined_kv", "model")) + _REPLICATED_RULES


def create_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {fill} in {sizes}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if any(s == 0 or s < -1 for s in sizes.values()) or len(devices) % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {len(devices)} available devices; "
                         "choose sizes whose product is the device count (or use -1 for one axis)")
    if fill:
        sizes[fill[0]] = len(devices) // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {int(np.prod(shape))} devices but "
                         f"{len(devices)} are available; make the sizes multiply to {len(devices)}")
    # Auto axes: XLA propagates shardings from the constraints the model annotates
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules):
    """Context in which the model's logical activation constraints take effect (trace jit inside)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_mesh_spec(logical_axes: Sequence[Optional[str]], rules: LogicalRules) -> PartitionSpec:
    """Mesh PartitionSpec for one array's logical axis names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def params_logical_specs(abstract_params) -> Any:
    """Tree of logical PartitionSpecs (e.g. P('embed', 'heads', 'kv')) of a boxed params tree."""
    return nn.get_partition_spec(abstract_params)


def params_shardings(abstract_params, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedSharding per parameter, same tree as the unboxed params.

    `abstract_params` is the boxed tree from `ul2lab.models.abstract_params(config)`
    (or `init(...)` before unboxing); unboxed leaves are replicated.
    """
    return nn.logical_to_mesh_sharding(params_logical_specs(abstract_params), mesh, rules)


def batch_partition_spec(ndim: int, rules: LogicalRules) -> PartitionSpec:
    """Batch arrays [batch, length, ...] split their leading dimension like activations."""
    return logical_to_mesh_spec(("batch",) + ("length",) + (None,) * (ndim - 2) if ndim > 1
                                else ("batch",), rules)


def host_batch_to_global(batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules = None,
                         partition_spec: Optional[PartitionSpec] = None) -> dict:
    """Assemble this host's rows of every feature into global arrays sharded over the mesh.

    Each process passes its own slice of the global batch (leading dimension);
    `partition_spec` overrides the spec derived from the 'batch' rule.
    """
    if rules is None and partition_spec is None:
        rules = standard_logical_axis_rules()
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        spec = partition_spec if partition_spec is not None else batch_partition_spec(value.ndim, rules)
        out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
