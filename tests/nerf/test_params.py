"""Parameter vectors: the shared init, safetensors round trips, and refusing bad files."""

import dataclasses

import pytest
import torch

from p2n.config import FieldConfig
from p2n.nerf.field import NeRFField, init_params, param_layout
from p2n.nerf.params import ParamsError, load_params, params_from_bytes, params_to_bytes, save_params

SMALL = FieldConfig(num_levels=4, log2_hashmap_size=10, max_resolution=32, hidden_dim=16, color_hidden_dim=16)


def test_shared_init_is_identical_for_the_same_seed_and_differs_across_seeds():
    a, b = init_params(SMALL, 0), init_params(SMALL, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, init_params(SMALL, 1))
    assert a.numel() == param_layout(SMALL).numel == NeRFField(SMALL).num_params
    table = param_layout(SMALL).unflatten(a)["encoding.table"]
    assert table.abs().max() <= 1e-4  # tiny-cuda-nn's hash-table init range


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    p = torch.randn(NeRFField(SMALL).num_params)
    save_params(tmp_path / "p.safetensors", p, SMALL, {"object_id": "x", "psnr_test": 30.5})
    q, cfg, meta = load_params(tmp_path / "p.safetensors", SMALL)
    assert torch.equal(p, q) and cfg == SMALL
    assert meta["object_id"] == "x" and float(meta["psnr_test"]) == 30.5


def test_wrong_layout_is_refused_with_the_difference_named():
    p = init_params(SMALL)
    other = dataclasses.replace(SMALL, hidden_dim=32)
    with pytest.raises(ParamsError, match="hidden_dim: file 16 vs config 32"):
        params_from_bytes(params_to_bytes(p, SMALL), other)


def test_nan_parameters_are_refused_on_save_and_load():
    p = init_params(SMALL)
    p[3] = float("nan")
    with pytest.raises(ParamsError, match="NaN"):
        params_to_bytes(p, SMALL)


def test_files_that_are_not_params_are_refused(tmp_path):
    from safetensors.torch import save

    with pytest.raises(ParamsError, match="not a safetensors"):
        params_from_bytes(b"\x00garbage", SMALL)
    blob = save({"weight": torch.zeros(3)}, metadata={"format": "p2n.vae"})
    with pytest.raises(ParamsError, match="not a p2n NeRF parameter file"):
        params_from_bytes(blob, SMALL)
    with pytest.raises(ParamsError, match="no such"):
        load_params(tmp_path / "missing.safetensors")


def test_implementation_does_not_change_the_layout():
    assert dataclasses.replace(SMALL, implementation="torch").layout_hash() == SMALL.layout_hash()
