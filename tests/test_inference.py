"""Inference: optimised CPU precision against fp32, batching, and the ensemble combination."""
from __future__ import annotations

import numpy as np
import pytest

from brainage_bids.cli.run import DEFAULT_MODEL
from brainage_bids.models.checkpoint import load_model
from brainage_bids.models.inference import ensemble, model_input, predict_arrays
from brainage_bids.utils.templates import get_template


@pytest.fixture(scope="module")
def default_inputs():
    """Model-grid arrays of the template brain with different noise and contrast."""
    tpl = get_template()
    model = load_model(DEFAULT_MODEL)
    base = model_input(str(tpl.brain), str(tpl.mask), model.input)
    rng = np.random.default_rng(0)
    arrays = [base]
    for gamma in (0.8, 1.25):
        x = np.where(base > 0, base ** gamma + rng.normal(0, 0.05, base.shape), 0).astype(np.float32)
        arrays.append(x / x[base > 0].mean())
    return model, arrays


def test_fast_precision_changes_ages_by_less_than_a_tenth_of_a_year(default_inputs):
    model, arrays = default_inputs
    ref_age, ref_sd, ref_p = predict_arrays(model, arrays, precision="fp32")
    age, sd, p = predict_arrays(model, arrays, precision="fast")
    assert np.all(np.abs(age - ref_age) < 1e-3), (age, ref_age)
    assert np.all(np.abs(sd - ref_sd) < 1e-3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)
    # the network is left in its usual memory format for the next caller
    w = next(model.network.parameters())
    assert w.is_contiguous()


def test_bf16_stays_within_the_documented_0_15_year(default_inputs):
    """bf16 is opt-in: on the shipped model it moved ages by up to 0.15 year (README; above the
    0.1-year tolerance of ``fast``); more than that contradicts the documentation."""
    model, arrays = default_inputs
    ref_age, _, _ = predict_arrays(model, arrays, precision="fp32")
    age, _, _ = predict_arrays(model, arrays, precision="bf16")
    diff = np.abs(age - ref_age)
    assert np.all(diff < 0.15), diff


def test_fast_on_cuda_runs_float32(monkeypatch):
    """``fast`` on CUDA is plain float32 (no float16 autocast) until a GPU benchmark shows
    float16 within 0.1 year; ``bf16`` on CUDA is bfloat16 autocast."""
    import torch

    from brainage_bids.models import inference

    used = []

    class Recorder:
        def __init__(self, device_type, dtype=None, **kw):
            used.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Recorder)
    net = torch.nn.Linear(3, 2)
    x = torch.ones(1, 3)
    out = inference._forward(net, x, "cuda", "fast")  # the device only selects the branch
    assert used == [] and out.dtype == torch.float32
    torch.testing.assert_close(out, net(x))
    inference._forward(net, x, "cuda", "bf16")
    assert used == [("cuda", torch.bfloat16)]


def test_batches_give_the_same_ages(default_inputs):
    model, arrays = default_inputs
    one, _, _ = predict_arrays(model, arrays, precision="fp32", batch_size=1)
    three, _, _ = predict_arrays(model, arrays, precision="fp32", batch_size=3)
    np.testing.assert_allclose(one, three, atol=1e-4)


def test_ensemble_combination():
    # law of total variance: mean of variances + population variance of the means
    age, sd = ensemble([50.0, 52.0], [2.0, 2.0])
    assert age == 51.0 and sd == pytest.approx(np.sqrt(4.0 + 1.0))
    age, sd = ensemble([50.0, 52.0, 57.0], [float("nan")] * 3)  # scalar outputs: spread only
    assert age == pytest.approx(53.0) and sd == pytest.approx(np.std([50, 52, 57]))
    age, sd = ensemble([50.0], [float("nan")])
    assert age == 50.0 and np.isnan(sd)
