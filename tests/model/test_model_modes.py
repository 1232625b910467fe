"""Evaluation mode for a while, then the model's earlier mode (lmforge.model.modes)."""

import pytest
from torch import nn

from lmforge.model.modes import evaluating


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_switches_to_eval_and_back_even_on_an_error(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train(training)
    with evaluating(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("scoring failed")
    assert model.training is training
