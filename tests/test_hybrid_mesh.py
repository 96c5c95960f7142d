"""ICI x DCN hybrid meshes: slices (or hosts) are blocks along the DCN axis, sizes multiply, and
settings that cannot fit the devices are refused with the sizes named."""
import dataclasses
import os

import gin
import numpy as np
import pytest

from ul2lab.train import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a device: 2 slices x 4 chips, or 2 GPU hosts x 4 GPUs (no slice)."""
    id: int
    process_index: int
    slice_index: int = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def slices(num_slices, per_slice, with_slice_index=True):
    return [FakeDevice(id=s * per_slice + i, process_index=s,
                       slice_index=s if with_slice_index else None)
            for s in range(num_slices) for i in range(per_slice)]


@pytest.mark.parametrize("with_slice_index", [True, False])
def test_dcn_data_puts_each_slice_in_its_own_block_of_the_data_axis(with_slice_index):
    devices = slices(2, 4, with_slice_index)[::-1]  # any order in, grouped by slice out
    array = partitioning.hybrid_device_array((2, 1, 2), (2, 1, 1), devices)
    assert array.shape == (4, 1, 2)  # data = 2 within a slice x 2 slices
    groups = np.vectorize(lambda d: d.process_index)(array)
    assert (groups[:2] == 0).all() and (groups[2:] == 1).all()
    assert sorted(d.id for d in array.flat) == list(range(8))


def test_dcn_on_two_axes_tiles_four_slices():
    array = partitioning.hybrid_device_array((1, 2, 2), (2, 2, 1), slices(4, 4))
    assert array.shape == (2, 4, 2)
    groups = np.vectorize(lambda d: d.slice_index)(array)
    # slice s sits at data block s // 2, fsdp block s % 2; 'model' never crosses slices
    for s in range(4):
        assert (groups[s // 2, 2 * (s % 2):2 * (s % 2) + 2] == s).all()


def test_slice_count_must_match_the_dcn_product():
    with pytest.raises(ValueError, match=r"needs 4 slices, but the 8 devices belong to 2 slices"):
        partitioning.hybrid_device_array((2, 1, 1), (4, 1, 1), slices(2, 4))


def test_devices_without_slices_group_by_process_and_say_so():
    with pytest.raises(ValueError, match="belong to 1 processes.*no TPU slice_index"):
        partitioning.create_mesh(data=-1, dcn_data=2)  # 8 CPU devices of this one process


def test_uneven_slices_are_refused():
    devices = slices(2, 4)[:-1]  # 4 + 3
    with pytest.raises(ValueError, match="cannot be split into 2 equal slices"):
        partitioning.create_mesh(data=-1, dcn_data=2, devices=devices)
    devices = slices(2, 4)
    devices[3] = FakeDevice(id=3, process_index=1, slice_index=1)  # 3 + 5
    with pytest.raises(ValueError, match=r"needs 4 devices in each of the 2 slices, but they hold \{0: 3, 1: 5\}"):
        partitioning.hybrid_device_array((2, 1, 2), (2, 1, 1), devices)


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=4, model=2, dcn_data=2), r"do not divide the 4 available devices within each slice"),
    (dict(data=2, model=1, dcn_data=2), r"uses 2 devices but 4 are available within each slice"),
    (dict(data=-1, dcn_fsdp=3), r"cannot be split into 3 equal slices"),
    (dict(data=-1, dcn_model=0), r"must be whole numbers >= 1"),
])
def test_bad_dcn_sizes_name_the_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partitioning.create_mesh(**kwargs)


def test_without_dcn_the_mesh_is_unchanged():
    mesh = partitioning.create_mesh(data=-1, model=2, dcn_data=1)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}


def test_multislice_gin_reaches_create_mesh():
    from ul2lab.runs import gin_config as gin_registry
    from ul2lab.models.config import preset

    train_config = gin_registry.register()["TrainConfig"]
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(REPO, "gin/partitioning/multislice.gin")], ["NUM_SLICES = 2"])
        config = train_config(model_dir="unused", model=preset("tiny"), mixture_or_task_name="unused",
                              task_feature_lengths={"inputs": 8, "targets": 8}, train_steps=1, batch_size=8)
    finally:
        gin.clear_config()
    assert config.mesh_shape == {"data": 1, "fsdp": -1, "model": 1, "dcn_data": 2}
    assert config.logical_axis_rules == "fsdp"
    # one process with no slices: the gin file's mesh is refused with the reason
    with pytest.raises(ValueError, match="needs 2 processes"):
        partitioning.create_mesh(**config.mesh_shape)
