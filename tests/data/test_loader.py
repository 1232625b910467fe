import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import BatchLoader


class ArraySplit:
    """A token split held in memory: token i has value i, so every batch shows where it was read from."""

    def __init__(self, n_tokens: int) -> None:
        self.tokens = np.arange(n_tokens, dtype=np.int64)
        self.n_tokens = n_tokens

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def starts(batches) -> list[int]:
    return [int(row[0]) for x, _ in batches for row in x]


def test_batches_are_shifted_int64_windows():
    loader = BatchLoader(ArraySplit(1000), seq_len=8, batch_size=4, seed=0)
    x, y = next(loader)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert torch.equal(y, x + 1)  # token value = position, so shifted by one position means +1
    for row in x:
        assert int(row[0]) % 8 == 0
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 8))


def test_one_epoch_covers_every_window_once():
    # 12 windows of 8 tokens (+1 target) need 97 tokens; 3 batches of 4 use them all.
    loader = BatchLoader(ArraySplit(97), seq_len=8, batch_size=4, seed=3)
    assert loader.n_windows == 12 and loader.batches_per_epoch == 3
    epoch = take(loader, 3)
    assert sorted(starts(epoch)) == [8 * k for k in range(12)]
    xs = torch.cat([x for x, _ in epoch])
    ys = torch.cat([y for _, y in epoch])
    order = xs[:, 0].argsort()
    assert torch.equal(xs[order].flatten(), torch.arange(0, 96))
    assert torch.equal(ys[order].flatten(), torch.arange(1, 97))


def test_leftover_windows_are_dropped_not_padded():
    loader = BatchLoader(ArraySplit(8 * 10 + 1), seq_len=8, batch_size=4, seed=0)
    assert loader.n_windows == 10 and loader.batches_per_epoch == 2


def test_same_seed_same_batches_other_seed_other_order():
    a = take(BatchLoader(ArraySplit(2000), 16, 4, seed=7), 5)
    b = take(BatchLoader(ArraySplit(2000), 16, 4, seed=7), 5)
    c = take(BatchLoader(ArraySplit(2000), 16, 4, seed=8), 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert starts(a) != starts(c)


def test_each_epoch_is_a_new_permutation():
    loader = BatchLoader(ArraySplit(16 * 32 + 1), seq_len=16, batch_size=4, seed=1)
    per_epoch = loader.batches_per_epoch
    first, second = starts(take(loader, per_epoch)), starts(take(loader, per_epoch))
    assert loader.epoch == 1
    assert sorted(first) == sorted(second) == [16 * k for k in range(32)]
    assert first != second
    expected = np.random.default_rng((1, 1)).permutation(32) * 16
    assert second == expected.tolist()


def test_state_round_trip_yields_the_same_next_batches():
    original = BatchLoader(ArraySplit(8 * 20 + 1), seq_len=8, batch_size=3, seed=5)
    take(original, 8)  # 6 batches per epoch: the state sits inside the second epoch
    state = json.loads(json.dumps(original.state_dict()))
    assert state == {"epoch": 1, "position": 2}
    restored = BatchLoader(ArraySplit(8 * 20 + 1), seq_len=8, batch_size=3, seed=5)
    restored.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(take(original, 10), take(restored, 10)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_at_epoch_end_rolls_over_on_resume():
    a = BatchLoader(ArraySplit(8 * 8 + 1), seq_len=8, batch_size=4, seed=0)
    take(a, 2)
    assert a.state_dict() == {"epoch": 0, "position": 2}
    b = BatchLoader(ArraySplit(8 * 8 + 1), seq_len=8, batch_size=4, seed=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(a)[0], next(b)[0])
    assert b.state_dict() == {"epoch": 1, "position": 1}


def test_bad_state_is_refused():
    loader = BatchLoader(ArraySplit(1000), seq_len=8, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="position=99"):
        loader.load_state_dict({"epoch": 0, "position": 99})


def test_ranks_read_disjoint_windows_in_lockstep():
    split = ArraySplit(8 * 41 + 1)  # 41 windows: 10 batches of 4, 5 per rank, one window left over
    ranks = [BatchLoader(split, seq_len=8, batch_size=4, seed=2, rank=r, world_size=2) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [5, 5]
    seen = [starts(take(r, 5)) for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 40
    single = starts(take(BatchLoader(split, seq_len=8, batch_size=4, seed=2), 10))
    # Rank r takes global batches r, r + 2, ...: together they read the single-process order.
    assert seen[0] == [s for b in range(0, 10, 2) for s in single[4 * b : 4 * b + 4]]
    assert seen[1] == [s for b in range(1, 10, 2) for s in single[4 * b : 4 * b + 4]]


def test_too_short_split_names_the_numbers():
    with pytest.raises(ValueError, match=r"seq_len=64 x batch_size=4 needs at least 257 tokens.*n_tokens=200"):
        BatchLoader(ArraySplit(200), seq_len=64, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="world_size=2"):
        BatchLoader(ArraySplit(300), seq_len=64, batch_size=4, seed=0, rank=1, world_size=2)


def test_reads_a_real_token_split_across_shard_boundaries(tmp_path):
    from lmforge.data.shards import open_split

    tokens = np.arange(201, dtype="<u2")
    shards = []
    for k, part in enumerate((tokens[:123], tokens[123:])):
        part.tofile(tmp_path / f"train_{k:05d}.bin")
        np.save(tmp_path / f"train_{k:05d}.docs.npy", np.zeros(1, dtype=np.int64))
        shards.append({"file": f"train_{k:05d}.bin", "n_tokens": len(part), "n_docs": 1})
    index = {"format": 1, "dtype": "uint16", "vocab_size": 300, "bos_id": 0, "eos_id": 1,
             "splits": {"train": {"shards": shards, "n_tokens": 201, "n_docs": 2, "n_bytes": 201}}}  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = BatchLoader(open_split(tmp_path, "train"), seq_len=10, batch_size=4, seed=0)
    epoch = take(loader, loader.batches_per_epoch)
    assert sorted(starts(epoch)) == list(range(0, 200, 10))
    for x, y in epoch:
        assert torch.equal(y, x + 1)
        for row in x:
            assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))
