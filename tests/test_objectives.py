"""Pre-training objectives: noise statistics match their settings, corruption is lossless, losses have the
invariants they should."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import (
    CROP_RANGE,
    IGNORE_INDEX,
    contrastive_loss,
    contrastive_views,
    mlm_accuracy,
    mlm_batch,
    mlm_loss,
    noise_mask,
    objective_batch,
    objective_loss,
    objective_loss_tokens,
    pooled_embeddings,
    prefix_lm_batch,
    prefix_lm_loss,
    reconstruct,
    span_batch,
    span_corruption,
    span_counts,
    span_loss,
    span_source_length,
)
from lmforge.losses import LossContext
from lmforge.objectives import PretrainConfig
from lmforge.tokenizer import N_SENTINELS, SPECIAL_TOKENS

V = 500
N_SPECIAL = len(SPECIAL_TOKENS)
MASK_ID = SPECIAL_TOKENS.index("<|mask|>")
SENTINELS = list(range(MASK_ID + 1, MASK_ID + 1 + N_SENTINELS))
PAD_ID = 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_tokens(shape, seed: int = 0) -> torch.Tensor:
    """Ordinary (non-special) token ids, as the tokenizer emits for text."""
    return torch.randint(N_SPECIAL, V, shape, generator=gen(seed))


def tiny_model(seed: int = 0, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                     max_seq_len=max_seq_len)  # fmt: skip
    return Transformer(args)


# --------------------------------------------------------------------------------------------------------- MLM


@pytest.mark.parametrize("p,mask_frac,random_frac", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)])
def test_mlm_noise_matches_settings(p, mask_frac, random_frac):
    tokens = text_tokens((64, 512))
    tokens[:, ::8] = torch.randint(0, N_SPECIAL, (64, 64), generator=gen(1))  # BOS, PAD, sentinels, ... sprinkled
    special = tokens < N_SPECIAL
    batch = mlm_batch(tokens, mask_id=MASK_ID, vocab_size=V, special_ids=range(N_SPECIAL), probability=p,
                      mask_fraction=mask_frac, random_fraction=random_frac, generator=gen())  # fmt: skip
    inputs, labels = batch["input_ids"], batch["labels"]
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])  # specials and unselected tokens untouched
    n = int(selected.sum())
    assert abs(n / int((~special).sum()) - p) < 0.01  # ~28k candidates: the std of the share is <= 0.003
    masked = selected & (inputs == MASK_ID)
    kept = selected & (inputs == tokens)
    randomised = selected & ~masked & ~kept
    assert abs(int(masked.sum()) / n - mask_frac) < 0.03
    # A random draw equal to the original (1 in 428) counts as kept; that shifts the shares by < 0.001.
    assert abs(int(randomised.sum()) / n - random_frac) < 0.02
    assert abs(int(kept.sum()) / n - (1 - mask_frac - random_frac)) < 0.02
    assert (inputs[randomised] >= N_SPECIAL).all()  # random replacements are never special tokens
    assert len(inputs[randomised].unique()) > 0.5 * min(int(randomised.sum()), V - N_SPECIAL)


def test_mlm_is_deterministic_per_seed():
    tokens = text_tokens((4, 64))
    kw = dict(mask_id=MASK_ID, vocab_size=V, special_ids=range(N_SPECIAL), probability=0.15, mask_fraction=0.8,
              random_fraction=0.1)  # fmt: skip
    a, b, c = (mlm_batch(tokens, generator=gen(s), **kw) for s in (3, 3, 4))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


def test_mlm_loss_and_accuracy():
    model = tiny_model()
    tokens = text_tokens((2, 32))
    batch = mlm_batch(tokens, mask_id=MASK_ID, vocab_size=V, special_ids=range(N_SPECIAL), probability=0.5,
                      mask_fraction=0.8, random_fraction=0.1, generator=gen())  # fmt: skip
    loss, metrics = mlm_loss(model, batch)
    assert abs(loss.item() - math.log(V)) < 0.5 and metrics == {}  # an untrained model is near uniform
    loss.backward()
    assert 0.0 <= mlm_accuracy(model, batch) <= 1.0
    # Accuracy counts argmax hits on selected tokens only: a model that always predicts the right tokens scores 1.
    oracle = lambda ids, **kw: torch.nn.functional.one_hot(tokens, V).float()  # noqa: E731
    assert mlm_accuracy(oracle, batch) == 1.0
    empty = {"input_ids": tokens, "labels": torch.full_like(tokens, IGNORE_INDEX)}
    assert mlm_loss(model, empty)[0].item() == 0.0 and mlm_accuracy(model, empty) == 0.0  # no NaN from 0/0


# --------------------------------------------------------------------------------------------- span corruption


def test_span_corruption_reconstructs_and_matches_statistics():
    g = gen()
    lengths_gen = torch.Generator().manual_seed(1)
    noise = total = 0
    span_lengths: list[int] = []
    starts_with_span = 0
    rows = 300
    for r in range(rows):
        n = int(torch.randint(2, 700, (1,), generator=lengths_gen))
        row = text_tokens((n,), seed=r)
        inputs, targets = span_corruption(row, density=0.15, mean_length=3.0, sentinel_ids=SENTINELS, generator=g)
        assert torch.equal(reconstruct(inputs, targets, SENTINELS), row)
        used = [t for t in inputs.tolist() if t in SENTINELS]
        n_noise, n_spans = span_counts(n, 0.15, 3.0)
        assert used == SENTINELS[: len(used)] and len(used) == n_spans <= N_SENTINELS
        assert [t for t in targets.tolist() if t in SENTINELS] == used
        assert len(targets) == n_noise + n_spans and len(inputs) == n - n_noise + n_spans
        starts_with_span += inputs[0].item() == SENTINELS[0]
        cuts = [i for i, t in enumerate(targets.tolist()) if t in SENTINELS] + [len(targets)]
        span_lengths += [b - a - 1 for a, b in zip(cuts, cuts[1:])]
        noise, total = noise + n_noise, total + n
    assert abs(noise / total - 0.15) < 0.002  # per row only rounding separates the two
    mean = sum(span_lengths) / len(span_lengths)
    assert abs(mean - 3.0) < 0.1
    assert min(span_lengths) == 1 and max(span_lengths) >= 8  # random lengths, not a fixed 3
    assert 0.4 < starts_with_span / rows < 0.6  # the coin: a row starts with a span about half the time


def test_noise_mask_density_at_other_settings():
    mask = torch.stack([noise_mask(1000, density=0.5, mean_length=8.0, generator=gen(s)) for s in range(20)])
    assert mask.float().mean() == 0.5
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum() + mask[:, 0].sum()
    assert abs(float(mask.sum()) / float(runs) - 8.0) < 0.1


def test_span_corruption_needs_enough_sentinels():
    row = text_tokens((1000,))
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(row, density=0.15, mean_length=3.0, sentinel_ids=SENTINELS[:10], generator=gen())


def test_span_batch_is_a_prefix_lm_batch_that_reconstructs():
    T = 256
    tokens = text_tokens((8, T + 1))
    batch = span_batch(tokens, density=0.15, mean_length=3.0, sentinel_ids=SENTINELS, pad_id=PAD_ID, generator=gen())
    x, y, prefix_len = batch["input_ids"], batch["labels"], batch["prefix_len"]
    assert x.shape == y.shape == (8, T) and prefix_len.shape == (8,)
    L = span_source_length(T + 1, 0.15, 3.0, N_SENTINELS)
    n_noise, n_spans = span_counts(L, 0.15, 3.0)
    assert L + 2 * n_spans <= T + 1 < L + 1 + 2 * span_counts(L + 1, 0.15, 3.0)[1]  # as many source tokens as fit
    for b in range(8):
        p = int(prefix_len[b])
        assert p == L - n_noise + n_spans
        end = p + n_noise + n_spans - 1  # last position with a target
        assert (y[b, : p - 1] == IGNORE_INDEX).all() and (y[b, end:] == IGNORE_INDEX).all()
        assert (y[b, p - 1 : end] != IGNORE_INDEX).all()
        assert (x[b, end:] == PAD_ID).all()
        assert torch.equal(x[b, p:end], y[b, p - 1 : end - 1])  # targets are read causally after the prefix
        assert torch.equal(reconstruct(x[b, :p], y[b, p - 1 : end], SENTINELS), tokens[b, :L])


def test_span_batch_shortens_rows_to_fit_the_sentinels():
    # Mean span length 1 on 2048-token rows would want ~280 spans; the source shrinks so 64 sentinels suffice.
    tokens = text_tokens((1, 2049))
    batch = span_batch(tokens, density=0.15, mean_length=1.0, sentinel_ids=SENTINELS, pad_id=PAD_ID, generator=gen())
    x = batch["input_ids"][0]
    assert int(((x >= SENTINELS[0]) & (x <= SENTINELS[-1])).sum()) == 2 * N_SENTINELS  # each in inputs and targets
    assert span_counts(span_source_length(2049, 0.15, 1.0, N_SENTINELS), 0.15, 1.0)[1] == N_SENTINELS


def test_default_settings_fit_1024_token_rows():
    L = span_source_length(1025, 0.15, 3.0, N_SENTINELS)
    assert L > 900 and span_counts(L, 0.15, 3.0)[1] < N_SENTINELS  # the sentinel count is not what limits it


# --------------------------------------------------------------------------------------------------- prefix LM


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_prefix_lm_targets_ignore_the_prefix(fraction):
    T = 40
    tokens = text_tokens((2000, T + 1))
    batch = prefix_lm_batch(tokens, prefix_fraction=fraction, generator=gen())
    x, y, prefix_len = batch["input_ids"], batch["labels"], batch["prefix_len"]
    assert torch.equal(x, tokens[:, :-1])
    assert prefix_len.min() >= 1 and prefix_len.max() <= T - 1
    for b in range(0, 2000, 97):
        p = int(prefix_len[b])
        assert (y[b, : p - 1] == IGNORE_INDEX).all()
        assert torch.equal(y[b, p - 1 :], tokens[b, p:])  # every token after the prefix is predicted
    assert abs(float(prefix_len.float().mean()) / T - fraction) < 0.02


def test_prefix_lm_loss_reads_the_prefix_both_ways():
    model = tiny_model()
    tokens = text_tokens((1, 33))
    batch = prefix_lm_batch(tokens, prefix_fraction=0.5, generator=gen())
    assert span_loss is prefix_lm_loss and torch.isfinite(prefix_lm_loss(model, batch)[0])
    p = int(batch["prefix_len"][0])
    kw = dict(attn="prefix", prefix_len=batch["prefix_len"])

    def changed_outputs(pos: int) -> torch.Tensor:
        ids = batch["input_ids"].clone()
        ids[0, pos] = ids[0, pos] + 1 if ids[0, pos] < V - 1 else N_SPECIAL
        with torch.no_grad():
            return (model(ids, **kw) - model(batch["input_ids"], **kw)).abs().amax(-1)[0] > 1e-6

    assert changed_outputs(p - 1)[0]  # the first token sees the last prefix token
    assert not changed_outputs(p)[:p].any()  # no prefix token sees past the prefix


# ------------------------------------------------------------------------------------------------- contrastive


class ConstantEncoder(torch.nn.Module):
    """Every token's hidden state is the same vector, so every text embeds to the same point."""

    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.Parameter(torch.randn(16))

    def forward(self, input_ids, **kw):
        return self.h.expand(*input_ids.shape, 16)


@pytest.mark.parametrize("B", [2, 7, 32])
def test_contrastive_loss_of_identical_embeddings_is_log_batch(B):
    batch = contrastive_views(text_tokens((B, 48)), pad_id=PAD_ID, generator=gen())
    loss, metrics = contrastive_loss(ConstantEncoder(), batch, temperature=0.05)
    assert loss.item() == pytest.approx(math.log(B), abs=1e-5)
    assert objective_loss_tokens("contrastive", batch) == B
    # In a step of 4B pairs spread over 2 parts, this batch's share is a quarter of its mean.
    share, _ = contrastive_loss(ConstantEncoder(), batch, LossContext(tokens=4 * B, parts=2))
    assert share.item() == pytest.approx(math.log(B) / 4, abs=1e-5)


class OracleEncoder(torch.nn.Module):
    """Text i's views (rows i and B+i) embed to the i-th unit vector: every pair is found."""

    def forward(self, input_ids, **kw):
        n = input_ids.shape[0] // 2
        return torch.eye(n)[torch.arange(2 * n) % n][:, None, :].expand(2 * n, input_ids.shape[1], n)


@pytest.mark.parametrize("B", [2, 7])
def test_contrastive_pair_accuracy_is_the_share_of_pairs_found(B):
    batch = contrastive_views(text_tokens((B, 48)), pad_id=PAD_ID, generator=gen())
    loss, metrics = contrastive_loss(OracleEncoder(), batch, temperature=0.05)
    assert metrics["pair_accuracy"].item() == 1.0 and loss.item() < 1e-6
    # Scaled for a step of 4B pairs over 2 parts: the loop's average over the parts is then the step's accuracy.
    _, scaled = contrastive_loss(OracleEncoder(), batch, LossContext(tokens=4 * B, parts=2))
    assert scaled["pair_accuracy"].item() == pytest.approx(2 * B / (4 * B))


def test_contrastive_views_are_crops_with_deletions():
    B, T = 50, 100
    tokens = torch.arange(T).expand(B, T) + 1000 * torch.arange(B)[:, None]  # unique, increasing ids per row
    batch = contrastive_views(tokens, pad_id=-1, generator=gen())
    ids, mask = batch["input_ids"], batch["mask"]
    assert ids.shape[0] == 2 * B and mask.dtype == torch.bool
    assert (ids[~mask] == -1).all() and mask[:, 0].all()
    kept = []
    for r in range(2 * B):
        view = ids[r][mask[r]]
        row = r % B
        assert ((view >= 1000 * row) & (view < 1000 * row + T)).all()  # taken from its own text
        assert (view.diff() > 0).all()  # in order
        assert int(view[-1] - view[0]) + 1 <= math.ceil(CROP_RANGE[1] * T)  # within one crop
        kept.append(len(view))
    assert CROP_RANGE[0] * 0.9 * 0.8 * T < sum(kept) / len(kept) < CROP_RANGE[1] * 0.9 * T  # ~ mean crop x 0.9


def test_pooled_embeddings_ignore_padding():
    model = tiny_model().eval()
    short, long = text_tokens((1, 10)), text_tokens((1, 30), seed=1)
    ids = torch.full((2, 30), PAD_ID)
    ids[0, :10], ids[1] = short[0], long[0]
    mask = ids != PAD_ID
    mask[1] = True
    with torch.no_grad():
        together = pooled_embeddings(model, ids, mask)
        alone = pooled_embeddings(model, short, torch.ones_like(short, dtype=torch.bool))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))


def test_contrastive_loss_falls_with_training():
    model = tiny_model()
    batch = contrastive_views(text_tokens((8, 48)), pad_id=PAD_ID, generator=gen())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = contrastive_loss(model, batch, temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------ by name


class FakeTokenizer:
    mask_id, pad_id, vocab_size = MASK_ID, PAD_ID, V
    special_ids, sentinel_ids = list(range(N_SPECIAL)), SENTINELS


@pytest.mark.parametrize("objective", ["clm", "mlm", "span", "prefix_lm", "contrastive"])
def test_every_objective_trains_from_loader_batches(objective):
    model = tiny_model()
    window = text_tokens((2, 33))
    cfg = PretrainConfig(objective=objective)
    batch = objective_batch(objective, window[:, :-1], window[:, 1:], cfg, FakeTokenizer(), gen())
    loss, _ = objective_loss(objective, cfg)(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # The loss tokens the loop counts: the pairs of a contrastive batch, the trained targets of the others.
    labels = batch[1] if objective == "clm" else batch.get("labels")
    expected = 2 if objective == "contrastive" else int((labels != IGNORE_INDEX).sum())
    assert objective_loss_tokens(objective, batch) == expected
    assert objective != "clm" or expected == 64
    loss.backward()
    with pytest.raises(ValueError, match="allowed values"):
        objective_loss("nope", cfg)
