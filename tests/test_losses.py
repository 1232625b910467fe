"""The one cross-entropy and its label convention (lmforge.losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.losses import LossContext, ce_loss, cross_entropy, label_count, shift_labels
from lmforge.tokenizer import IGNORE_INDEX


def test_cross_entropy_is_fp32_and_counts_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = IGNORE_INDEX
    per = cross_entropy(logits, labels, reduction="none")
    assert per.shape == (2, 5) and per.dtype == torch.float32
    assert torch.equal(per[0, :3], torch.zeros(3))
    manual = -logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(per[keep], manual[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(cross_entropy(logits, labels), manual[keep].sum(), rtol=1e-6, atol=1e-5)
    assert label_count(labels).item() == 7
    # Called alone, a loss is the mean over its labelled positions, as F.cross_entropy's default.
    loss, metrics = ce_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()))
    assert metrics == {}
    nothing = torch.full_like(labels, IGNORE_INDEX)
    assert ce_loss(logits, nothing)[0].item() == 0.0  # not NaN


def test_labels_aligned_with_inputs_shift_to_the_logits():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [1, 2, 3, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX], [2, 3, IGNORE_INDEX, IGNORE_INDEX]]


def test_a_step_of_shares_is_the_mean_over_all_its_tokens():
    """Micro-batches of 3 and 1 labelled tokens: their shares of the step add up to the mean over the 4 tokens,
    where the mean of their means would weigh the lone token three times as much."""
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 3, 5)
    labels = torch.tensor([[[1, 2, 3]], [[4, IGNORE_INDEX, IGNORE_INDEX]]])
    ctx = LossContext(tokens=4, parts=2)
    step = sum(ce_loss(logits[i], labels[i], ctx)[0] for i in range(2))
    every = cross_entropy(logits, labels) / 4
    torch.testing.assert_close(step, every)
    means = sum(ce_loss(logits[i], labels[i])[0] for i in range(2)) / 2
    assert not math.isclose(float(step), float(means), rel_tol=1e-3)
    with pytest.raises(KeyError):
        ctx.frozen["reference"]  # no frozen model unless the loop was given one
