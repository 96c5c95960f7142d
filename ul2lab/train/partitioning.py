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


def create_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None,
                dcn_data: int = 1, dcn_fsdp: int = 1, dcn_model: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh; one of data/fsdp/model may be -1 to take the remaining devices.

    With a dcn_* factor > 1 the mesh spans several TPU slices (or GPU hosts) joined by the slower
    data-center network: data/fsdp/model are then the sizes within one slice (ICI), dcn_* the
    number of slices along each axis, and each mesh axis is their product (maxtext's
    ici_*/dcn_*_parallelism). Put the DCN factor on 'data' (or 'fsdp'): those axes communicate
    once per step, 'model' every layer.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {"dcn_data": dcn_data, "dcn_fsdp": dcn_fsdp, "dcn_model": dcn_model}
    if any(not isinstance(size, (int, np.integer)) or size < 1 for size in dcn.values()):
        raise ValueError(f"DCN mesh sizes {dcn} must be whole numbers >= 1 (1 = not split across slices)")
    num_granules = int(np.prod(list(dcn.values())))
    if len(devices) % num_granules:
        raise ValueError(f"the DCN mesh {dcn} spans {num_granules} slices but the {len(devices)} devices "
                         f"cannot be split into {num_granules} equal slices; make dcn_data * dcn_fsdp * "
                         "dcn_model the number of slices (or hosts)")
    ici_shape = _axis_sizes(data, fsdp, model, len(devices) // num_granules,
                            "within each slice" if num_granules > 1 else "")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if num_granules == 1:
        # Auto axes: XLA propagates shardings from the constraints the model annotates
        return jax.make_mesh(ici_shape, MESH_AXES, axis_types=axis_types, devices=devices)
    device_array = hybrid_device_array(ici_shape, tuple(dcn.values()), devices)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def _axis_sizes(data: int, fsdp: int, model: int, num_devices: int, where: str) -> Tuple[int, ...]:
    """(data, fsdp, model) sizes multiplying to num_devices, with a -1 filled in."""
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    where = f" {where}" if where else ""
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got {fill} in {sizes}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if any(s == 0 or s < -1 for s in sizes.values()) or num_devices % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} available devices{where}; "
                         "choose sizes whose product is the device count (or use -1 for one axis)")
    if fill:
        sizes[fill[0]] = num_devices // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {int(np.prod(shape))} devices but "
                         f"{num_devices} are available{where}; make the sizes multiply to {num_devices}")
    return shape


def hybrid_device_array(ici_shape: Sequence[int], dcn_shape: Sequence[int], devices) -> np.ndarray:
    """Devices arranged as ici_shape * dcn_shape: slices (TPU slice_index) or, where devices have no
    slice, processes (one GPU host each) are the units of the outer, DCN dimension."""
    from jax.experimental import mesh_utils

    devices = list(devices)
    by_slice = all(getattr(d, "slice_index", None) is not None for d in devices)
    key = "slice_index" if by_slice else "process_index"
    granules = sorted({getattr(d, key) for d in devices})
    num_granules = int(np.prod(dcn_shape))
    units = "slices" if by_slice else "processes"
    if len(granules) != num_granules:
        raise ValueError(f"the DCN mesh {dict(zip(MESH_AXES, dcn_shape))} needs {num_granules} {units}, but "
                         f"the {len(devices)} devices belong to {len(granules)} {units}"
                         + ("" if by_slice else " (they have no TPU slice_index, so each process is a unit)")
                         + "; set dcn_data * dcn_fsdp * dcn_model to that number, or start one process per "
                         "host (with one process per GPU leave dcn_* at 1: the plain mesh is already "
                         "host-major, so 'model' stays within a host)")
    counts = {g: sum(getattr(d, key) == g for d in devices) for g in granules}
    per_granule = int(np.prod(ici_shape))
    if any(n != per_granule for n in counts.values()):
        raise ValueError(f"the per-slice mesh {dict(zip(MESH_AXES, ici_shape))} needs {per_granule} devices "
                         f"in each of the {num_granules} {units}, but they hold {counts}")
    # allow_split_physical_axes: a TPU slice's torus may be cut where the logical sizes need it
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=not by_slice,
                                                allow_split_physical_axes=True)


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

    `abstract_params` is the boxed tree from `ul2lab.models.network.abstract_params(config)`
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
