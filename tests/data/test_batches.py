"""The batch-source protocol and its shared implementation (lmforge.data.batches)."""

import json

import numpy as np
import pytest
import torch

from lmforge.data.batches import BatchesWrapper, BatchSource, ShuffledRows, count_labels
from lmforge.tokenizer import IGNORE_INDEX


class Rows(ShuffledRows):
    """Batches of the row indices themselves, so a test sees exactly which rows it got."""

    def __next__(self) -> np.ndarray:
        return self._next_rows()


def test_whole_epochs_skip_the_tail_and_ranks_split_each_global_batch():
    one = Rows(10, batch_size=4, seed=3)
    ranks = [Rows(10, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert one.batches_per_epoch == 2  # 10 rows hold two global batches of 4; 2 rows are skipped
    epoch0 = []
    for _ in range(3):
        whole = next(one)
        parts = [next(r) for r in ranks]
        assert np.array_equal(np.concatenate(parts), whole)  # the ranks' shares are the one-process batch
        epoch0.append(whole)
    assert one.state_dict() == {"epoch": 1, "position": 1}  # the third batch opened epoch 1
    assert len(set(np.concatenate(epoch0[:2]).tolist())) == 8
    assert np.array_equal(epoch0[0], np.random.default_rng((3, 0)).permutation(10)[:4])


def test_carry_over_runs_a_batch_into_the_next_epoch_and_counts_rows():
    rows = Rows(5, batch_size=3, seed=0, carry_over=True)
    first, second = next(rows), next(rows)
    order0, order1 = (np.random.default_rng((0, e)).permutation(5) for e in (0, 1))
    assert np.array_equal(first, order0[:3])
    assert np.array_equal(second, np.concatenate([order0[3:], order1[:1]]))  # straddles epochs 0 and 1
    assert rows.state_dict() == {"epoch": 1, "position": 1}


def test_state_round_trips_through_json_and_is_checked():
    a = Rows(50, batch_size=4, seed=7)
    for _ in range(15):
        next(a)
    b = Rows(50, batch_size=4, seed=7)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert all(np.array_equal(next(a), next(b)) for _ in range(20))
    with pytest.raises(ValueError, match=r"position=13 does not fit this data \(12 batches per epoch\)"):
        b.load_state_dict({"epoch": 0, "position": 13})
    with pytest.raises(ValueError, match=r"\(50 rows per epoch\)"):
        Rows(50, batch_size=4, seed=7, carry_over=True).load_state_dict({"epoch": 0, "position": 51})


def test_a_wrapper_passes_the_state_and_the_loss_tokens_through():
    class Doubled(BatchesWrapper):
        def __next__(self):
            return next(self.source) * 2

    inner = Rows(20, batch_size=2, seed=1)
    outer = Doubled(inner)
    assert isinstance(outer, BatchSource) and isinstance(inner, BatchSource)
    next(outer)
    assert outer.state_dict() == inner.state_dict() == {"epoch": 0, "position": 1}
    outer.load_state_dict({"epoch": 2, "position": 3})
    assert inner.state_dict() == {"epoch": 2, "position": 3}
    labels = torch.tensor([[1, IGNORE_INDEX, 3]])
    batch = {"input_ids": labels, "labels": labels}
    assert outer.loss_tokens(batch) == count_labels(batch) == count_labels((labels, labels)) == 2
    with pytest.raises(TypeError):
        BatchesWrapper(inner)  # __next__ is the wrapper's own job
