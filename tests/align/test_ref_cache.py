"""The reference cache: cached log-probabilities equal on-the-fly ones, a cache killed half-way resumes with only the
missing chunks, and a cache of other pairs or another model is recomputed."""

import json
import random

import pytest
import torch
from helpers import tiny_chat_model

from lmforge.align.losses import sequence_logps
from lmforge.align.pair_batches import PairBatches, split_sides
from lmforge.align.preferences import PreferencePair, render_pairs
from lmforge.align.ref_cache import META, compute_reference, reference_logps
from lmforge.finetune.data import Message, Skipped
from lmforge.model.io import load_checkpoint_tokenizer, load_model

WORDS = ["the", "water", "is", "good", "for", "people", "and", "plants", "time", "list", "make", "three", "new"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = tiny_chat_model(tmp_path_factory.mktemp("ref"))
    tok = load_checkpoint_tokenizer(ckpt)
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    pairs = [PreferencePair([Message("user", words(rng.randint(2, 6)))], words(rng.randint(1, 9)),
                            words(rng.randint(1, 9)), source=f"toy[{i}]") for i in range(21)]  # fmt: skip
    rendered = render_pairs(tok, pairs, 64, Skipped())
    model, _ = load_model(ckpt)
    return model, rendered, tok.pad_id


class Failing(torch.nn.Module):
    """The model, failing at its `fail_at`-th forward (a run killed half-way); counts its forwards."""

    def __init__(self, model, fail_at=None):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.model(ids)


def test_cached_log_probs_equal_the_ones_computed_in_a_training_batch(setup, tmp_path):
    model, pairs, pad = setup
    cached = reference_logps(model, pairs, pad, tmp_path / "ref", "ckpt-a", chunk_size=8, batch_size=4)
    assert cached.chosen_logp.shape == (21,) and cached.chosen_logp.dtype == torch.float32
    # the same batches on the fly: bit for bit
    assert all(torch.equal(getattr(cached, f), getattr(compute_reference(model, pairs, pad, 4), f))
               for f in ("chosen_logp", "chosen_tokens", "rejected_logp", "rejected_tokens"))  # fmt: skip
    # a shuffled training batch of other pairs and padding: the same values to float rounding
    batch = next(PairBatches(pairs, 6, pad, seed=5))
    with torch.no_grad():
        logp, tokens = sequence_logps(model(batch["input_ids"]), batch["labels"])
    ref_logp, ref_tokens = cached.take(batch["index"])
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-5)
    chosen, _ = split_sides(logp)
    assert chosen.abs().min() > 1  # sums over several reply tokens, not zeros


def test_a_cache_killed_half_way_resumes_with_only_the_missing_chunks(setup, tmp_path):
    model, pairs, pad = setup
    whole = reference_logps(model, pairs, pad, tmp_path / "whole", "ckpt-a", chunk_size=4, batch_size=2)
    killed = Failing(model, fail_at=5)  # 2 forwards per chunk: dies in the third chunk
    with pytest.raises(KeyboardInterrupt):
        reference_logps(killed, pairs, pad, tmp_path / "ref", "ckpt-a", chunk_size=4, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "ref").glob("chunk_*")) == ["chunk_00000.safetensors",
                                                                          "chunk_00001.safetensors"]  # fmt: skip
    assert not list((tmp_path / "ref").glob("*.tmp*"))  # atomic writes leave no partial chunk
    again = Failing(model)
    resumed = reference_logps(again, pairs, pad, tmp_path / "ref", "ckpt-a", chunk_size=4, batch_size=2)
    assert again.calls == 2 * 3 + 1  # chunks 2..5 (two batches each, the last one pair) and nothing else
    assert all(torch.equal(getattr(whole, f), getattr(resumed, f)) for f in ("chosen_logp", "rejected_logp"))
    untouched = Failing(model)
    reference_logps(untouched, pairs, pad, tmp_path / "ref", "ckpt-a", chunk_size=4, batch_size=2)
    assert untouched.calls == 0  # complete: read, not computed


def test_a_cache_of_other_pairs_or_another_model_is_recomputed(setup, tmp_path):
    model, pairs, pad = setup
    reference_logps(model, pairs, pad, tmp_path, "ckpt-a", chunk_size=4, batch_size=2)
    key = json.loads((tmp_path / META).read_text())["key"]
    for other_pairs, model_key in ((pairs, "ckpt-b"), (pairs[:-1], "ckpt-a")):
        counting = Failing(model)
        out = reference_logps(counting, other_pairs, pad, tmp_path, model_key, chunk_size=4, batch_size=2)
        assert counting.calls > 0 and out.chosen_logp.shape == (len(other_pairs),)
        assert json.loads((tmp_path / META).read_text())["key"] != key
