"""Fitting from the shared init reaches a real PSNR, and saved params render at the recorded PSNR."""

import torch

from p2n.config import P2NConfig
from p2n.nerf.fit import FitError, evaluate, fit
from p2n.scenes import render_object, resolve_scene

import pytest

SMALL = ["scene.image_size=32", "scene.num_train_views=20", "scene.num_test_views=4", "fit.steps=120",
         "fit.rays_per_step=2048", "fit.target_psnr=null"]


@pytest.fixture(scope="module")
def fitted():
    cfg = P2NConfig().override(SMALL)
    train, test = render_object(resolve_scene("a green sphere"), cfg.scene)
    return cfg, test, fit(train, cfg, test)


def test_fit_reaches_a_real_psnr_on_held_out_views(fitted):
    cfg, test, res = fitted
    assert res.steps == 120
    assert res.psnr_test > 26.0, res.psnr_test_views
    # Beats the empty field (background only) by a wide margin.
    from p2n.nerf.field import init_params

    assert res.psnr_test > sum(evaluate(init_params(cfg.field), test, cfg)) / len(test) + 8


def test_params_alone_reproduce_the_recorded_psnr(fitted):
    cfg, test, res = fitted
    again = evaluate(res.params.clone(), test, cfg)
    assert abs(sum(again) / len(again) - res.psnr_test) < 1e-3


def test_fitting_is_deterministic_for_a_seed():
    cfg = P2NConfig().override(SMALL).override(["fit.steps=15"])
    train, _ = render_object(resolve_scene("a blue cube"), cfg.scene)
    a, b = fit(train, cfg), fit(train, cfg)
    assert torch.equal(a.params, b.params)


def test_nan_views_are_rejected():
    cfg = P2NConfig().override(SMALL)
    train, _ = render_object(resolve_scene("a blue cube"), cfg.scene)
    train.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FitError, match="NaN"):
        fit(train, cfg)
