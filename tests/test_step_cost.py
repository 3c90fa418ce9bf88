"""What one training step costs (the numbers a GPU user sizes a full run with), and that measuring
it trains and writes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastslow import stages
from fastslow.cache import artifact_path
from fastslow.config import TrainConfig, make_config
from fastslow.train import StepCost, measure_step, measuring_first_step


def test_a_step_of_a_linear_layer_costs_its_two_matrix_products():
    model = nn.Linear(4, 3, bias=False)
    batches = [torch.ones(2, 4)] * 5

    def loss_fn(model, batch, progress):
        return model(batch).square().sum()

    cost = measure_step(model, loss_fn, batches, TrainConfig(batch_size=2), "cpu")
    # Forward x W^T and backward the weight's gradient (the input needs none): 2 x 4 x 3
    # multiply-adds each, 2 FLOPs a multiply-add.
    assert cost["gflop_per_step"] * 1e9 == pytest.approx(2 * 2 * (2 * 4 * 3))
    assert cost["steps_per_epoch"] == 5 and cost["trained_parameter_mb"] * 2**20 == 4 * 12
    # Autograd keeps the input (for the weight's gradient) and the output (for the square's).
    assert cost["activation_mb"] * 2**20 == pytest.approx(4 * (2 * 4 + 2 * 3))
    assert model.weight.grad is None  # measuring leaves no gradient behind


def test_measuring_the_first_step_trains_nothing_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    cfg = make_config("smoke", device="cpu")
    with pytest.raises(StepCost) as measured, measuring_first_step():
        stages.train_or_load_dual_encoder(cfg)
    assert measured.value.desc == "dual_encoder" and measured.value.cost["gflop_per_step"] > 0
    assert measured.value.cost["batch_size"] == cfg.train_dual.batch_size
    assert not artifact_path("dual_encoder", stages.dual_encoder_key(cfg)).exists()
