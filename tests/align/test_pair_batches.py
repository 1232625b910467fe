"""Pair batches: chosen rows then rejected rows, right-padded, labels shifted, resumable and rank-independent."""

import torch

from lmforge.align.pair_batches import PairBatches, collate_pairs, split_sides
from lmforge.align.preferences import RenderedPair

PAD = 0


def pair(k: int) -> RenderedPair:
    prompt = [1, 10 + k]
    return RenderedPair(prompt + [20 + k, 3], [-100, -100, 20 + k, 3], prompt + [30 + k, 31, 3],
                        [-100, -100, 30 + k, 31, 3], 2, False)


def test_collate_puts_chosen_first_and_shifts_labels():
    batch = collate_pairs([pair(0), pair(1)], PAD)
    assert batch["input_ids"].tolist() == [[1, 10, 20, 3, 0], [1, 11, 21, 3, 0], [1, 10, 30, 31, 3],
                                           [1, 11, 31, 31, 3]]
    # position t is scored against token t + 1: the reply tokens and the end of turn, nothing for the padding
    assert batch["labels"].tolist()[0] == [-100, 20, 3, -100, -100]
    assert batch["labels"].tolist()[2] == [-100, 30, 31, 3, -100]
    assert batch["lengths"].tolist() == [4, 4, 5, 5]
    chosen, rejected = split_sides(batch["lengths"])
    assert chosen.tolist() == [4, 4] and rejected.tolist() == [5, 5]


def test_batches_resume_and_split_over_ranks_like_one_process():
    pairs = [pair(k) for k in range(7)]
    one = PairBatches(pairs, 4, PAD, seed=3)
    seen = [next(one)["index"].tolist() for _ in range(3)]
    assert sorted(seen[0] + seen[1][:3]) == list(range(7))  # an epoch visits every pair once, then carries over
    assert one.loss_tokens(next(PairBatches(pairs, 4, PAD, seed=3))) == 4
    resumed = PairBatches(pairs, 4, PAD, seed=3)
    first = next(resumed)
    state = resumed.state_dict()
    again = PairBatches(pairs, 4, PAD, seed=3)
    again.load_state_dict(state)
    assert first["index"].tolist() == seen[0] and next(again)["index"].tolist() == seen[1]
    ranks = [PairBatches(pairs, 4, PAD, seed=3, rank=r, world_size=2) for r in range(2)]
    for expected in seen:
        got = [next(r)["index"].tolist() for r in ranks]
        assert got[0] + got[1] == expected
        assert torch.equal(torch.tensor(got[0]), torch.tensor(expected[:2]))
