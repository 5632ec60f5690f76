"""LPIPS against the reference implementation (the `lpips` package: its own AlexNet slicing, scaling layer and
shipped v0.1 lin weights, with a randomly initialised trunk since ImageNet weights cannot be downloaded here), and
the weights file's errors."""

import pytest
import torch

from p2n.align._torchvision_compat import ensure_torchvision_importable
from p2n.perceptual import LPIPSWeightsError, load_lpips


@pytest.fixture(scope="module")
def reference():
    ensure_torchvision_importable()
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(3)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lpips_equals_the_reference_package(tmp_path, reference, suffix):
    path = tmp_path / f"lpips_alex{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v for k, v in state.items() if not k.startswith("lins.")}, str(path))  # lins.* alias lin*
    ours = load_lpips(path)
    torch.manual_seed(0)
    x, y = torch.rand(3, 64, 64, 3), torch.rand(3, 64, 64, 3)
    y[0] = x[0]  # identical pair: distance 0
    y[1] = (x[1] + 0.05 * torch.randn_like(x[1])).clamp(0, 1)  # a little noise: small but not 0
    with torch.no_grad():
        want = reference(x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), normalize=True).flatten()
        got = ours(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got[0]) == 0.0 and 0 < float(got[1]) < float(got[2])


def test_lpips_weights_errors(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="not found; make the file"):
        load_lpips(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsError, match="not a readable weights file"):
        load_lpips(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, tmp_path / "torchvision_alexnet.pth")
    with pytest.raises(LPIPSWeightsError, match=r"no net.slice1.0.weight; expected the state_dict\(\) of lpips"):
        load_lpips(tmp_path / "torchvision_alexnet.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(LPIPSWeightsError, match="not a readable weights file"):  # weights_only refuses code
        load_lpips(tmp_path / "evil.pth")
