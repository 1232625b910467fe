"""SFT end to end on a tiny model: full (with freezing) and LoRA fine-tuning, the loss mask, resumable batches."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.finetune.data import read_conversations
from lmforge.model.lora import LoRAConfig
from lmforge.finetune.sft import SFTBatches, heldout_loss, sft_loss, split_heldout
from lmforge.finetune.template import IGNORE_INDEX, pack, render
from lmforge.losses import LossContext
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.train.config import TrainConfig

from helpers import INSTRUCT_DATA, sft_on_file, tiny_chat_model

DATA = INSTRUCT_DATA
LIMIT = 120


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("base"))


def _cfg(**kw):
    settings = dict(seq_len=128, batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3, eval_every=1000,
                    ckpt_every=1000, compile=False, threads=1, device="cpu")  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def _rows(ckpt, n=24):
    tok = load_checkpoint_tokenizer(ckpt)
    convs, _ = read_conversations(DATA, limit=n)
    return pack([render(tok, c) for c in convs], 128, tok.pad_id)


def test_full_sft_with_frozen_blocks_and_embeddings(base, tmp_path, caplog):
    out = tmp_path / "full"
    m = sft_on_file(base, DATA, out, _cfg(), freeze_blocks=1, freeze_embeddings=True, limit=LIMIT)
    assert "may never learn to end its turn" not in caplog.text  # the untied output layer still trains
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    assert m["steps"] == 30 and m["train_conversations"] + m["heldout_conversations"] == LIMIT
    assert m["heldout_conversations"] == 12 and m["skipped_records"] == 0
    assert 0 < m["trainable_params"] < m["total_params"]
    # The loss's metric reaches every step's record and the returned metrics (the stage's manifest).
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["token_accuracy"] for r in records]
    assert len(accuracy) == 30 and all(0 <= a <= 1 for a in accuracy) and accuracy[-1] > accuracy[0]
    assert m["final_metrics"] == {"token_accuracy": accuracy[-1]}
    assert all(r["loss_tokens"] > 0 for r in records)  # the step's trained tokens, counted by the loop
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("model.layers.0.", "model.embed_tokens."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k in before if k.startswith("model.layers.1.") and k.endswith("proj.weight")]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)
    load_model(out / "final")  # a complete, loadable checkpoint


def test_lora_sft_trains_only_adapters_and_merges(base, tmp_path, caplog):
    out = tmp_path / "lora"
    cfg = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    m = sft_on_file(base, DATA, out, _cfg(), method="lora", lora_rank=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"],
                    limit=LIMIT)
    assert "may never learn to end its turn" in caplog.text  # lm_head is not among the targets
    hint = "pass --lora-targets q_proj,v_proj,lm_head (in a recipe: sft.lora_targets: [q_proj, v_proj, lm_head])"
    assert hint in caplog.text
    base_model, args = load_model(base)
    per_layer = 2 * cfg.rank * (args.d_model + args.n_heads * args.head_dim)  # q and v: A [r, d] + B [out, r] each
    assert m["trainable_params"] == args.n_layers * per_layer
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    assert (out / "adapter/adapter.safetensors").is_file() and (out / "adapter/adapter.json").is_file()
    merged, _ = load_model(out / "final")
    b, f = base_model.state_dict(), merged.state_dict()
    targeted = {k for k in b if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(targeted) == 2 * args.n_layers
    assert all(not torch.equal(b[k], f[k]) for k in targeted)
    assert all(torch.equal(b[k], f[k]) for k in b if k not in targeted)
    # The written merged model is the one that was measured: it reproduces the reported held-out loss.
    tok = load_checkpoint_tokenizer(base)
    convs, _ = read_conversations(DATA, limit=LIMIT)
    val = pack([render(tok, convs[i]) for i in split_heldout(LIMIT, 0.1, _cfg().seed)[1]], 128, tok.pad_id)
    assert heldout_loss(merged, val, 8) == pytest.approx(m["heldout_loss_after"], rel=1e-5)


def test_prefix_sft_keeps_base_weights_and_loads_with_its_prefix(base, tmp_path):
    out = tmp_path / "prefix"
    m = sft_on_file(base, DATA, out, _cfg(lr=1e-2), method="prefix", prefix_length=4, prefix_reparam=True, limit=LIMIT)
    base_model, args = load_model(base)
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    # Only the MLP that generates the prefix trains; the saved prefix is its output, [L, 2, H_kv, P, D].
    assert 0 < m["trainable_params"] == m["total_params"] - sum(p.numel() for p in base_model.parameters())
    assert (out / "prefix/prefix.safetensors").is_file() and (out / "final/prefix/prefix.json").is_file()
    b, f = load_file(str(base / "model.safetensors")), load_file(str(out / "final/model.safetensors"))
    assert b.keys() == f.keys() and all(torch.equal(b[k], f[k]) for k in b)  # bit-identical base
    tuned, _ = load_model(out / "final")  # attaches final/prefix
    assert tuned.prefix_tuning.shape == (args.n_layers, 2, args.n_kv_heads, 4, args.head_dim)
    plain, _ = load_model(out / "final", prefix=False)
    assert not hasattr(plain, "prefix_tuning")
    # The written prefix is the one that was measured: it reproduces the reported held-out loss, one row each.
    tok = load_checkpoint_tokenizer(base)
    convs, _ = read_conversations(DATA, limit=LIMIT)
    val_rows = pack([render(tok, convs[i]) for i in split_heldout(LIMIT, 0.1, _cfg().seed)[1]], 128, tok.pad_id, one_per_row=True)
    assert len(val_rows.ids) == m["heldout_conversations"]
    assert heldout_loss(tuned, val_rows, 8) == pytest.approx(m["heldout_loss_after"], rel=1e-5)
    with pytest.raises(ValueError, match="prefix-tuned"):
        sft_on_file(out / "final", DATA, tmp_path / "again", _cfg(), limit=LIMIT)


def test_sft_loss_counts_only_trained_tokens(base):
    model, _ = load_model(base)
    rows = _rows(base)
    batches = SFTBatches(rows, batch_size=4, seed=1)
    batch = next(batches)
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    # Labels are aligned with the logits: the template's per-token labels shifted by one, nothing after the end.
    first = int(batches._permutation()[0])
    assert labels[0, :-1].tolist() == rows.labels[first][1:] and (labels[:, -1] == IGNORE_INDEX).all()
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).float()
    pos = labels != IGNORE_INDEX
    manual = F.cross_entropy(logits[pos], labels[pos])
    loss, metrics = sft_loss(model, batch)
    torch.testing.assert_close(loss, manual)
    hits = (logits[pos].argmax(-1) == labels[pos]).float().mean()
    torch.testing.assert_close(metrics["token_accuracy"], hits)
    assert batches.loss_tokens(batch) == int(pos.sum())
    # Counting the prompt tokens as well gives a different number: the mask is what limits the loss.
    every = torch.cat([batch["input_ids"][:, 1:], torch.full((4, 1), IGNORE_INDEX)], dim=1)
    assert not torch.isclose(sft_loss(model, {**batch, "labels": every})[0], manual)


def test_batches_resume_exactly(base):
    rows = _rows(base)
    a = SFTBatches(rows, batch_size=5, seed=3)
    for _ in range(7):  # past an epoch boundary
        next(a)
    state = a.state_dict()
    assert state["epoch"] >= 1
    expected = [next(a) for _ in range(4)]
    b = SFTBatches(rows, batch_size=5, seed=3)
    b.load_state_dict(state)
    for want, got in zip(expected, [next(b) for _ in range(4)]):
        assert want.keys() == got.keys() == {"input_ids", "labels", "doc_ids"}  # no step-wide count rides along
        for k in ("input_ids", "labels", "doc_ids"):
            assert want[k].dtype == torch.long and want[k].shape == (5, 128)
            assert torch.equal(want[k], got[k])


def test_ranks_split_each_global_batch_and_share_its_normalisation(base):
    """Two ranks' shares are the halves of the one-process batch; given the loss tokens of both (as the loop
    counts them), their losses add up to its loss and their metrics average to its metrics."""
    rows = _rows(base)
    model, _ = load_model(base)
    one = SFTBatches(rows, batch_size=6, seed=2)
    ranks = [SFTBatches(rows, batch_size=6, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
        counts = [ranks[r].loss_tokens(parts[r]) for r in range(2)]
        assert counts[0] != counts[1] and sum(counts) == one.loss_tokens(whole)
        ctx = LossContext(tokens=sum(counts), parts=2)
        (l0, m0), (l1, m1) = (sft_loss(model, p, ctx) for p in parts)
        loss, metrics = sft_loss(model, whole)
        torch.testing.assert_close(l0 + l1, loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close((m0["token_accuracy"] + m1["token_accuracy"]) / 2, metrics["token_accuracy"])
    with pytest.raises(ValueError, match="split evenly over 4 ranks"):
        SFTBatches(rows, batch_size=6, seed=2, rank=0, world_size=4)


def test_the_sft_command_fine_tunes_and_reports_held_out_loss(base, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "cli"
    args = ["sft", str(base), "--data", str(DATA), "-o", str(out), "--method", "lora", "--lora-rank", "4",
            "--limit", "60", "train.max_steps=6", "train.warmup_steps=1", "train.eval_every=6", "train.ckpt_every=6",
            "train.seq_len=128", "train.batch_size=8", "train.compile=false", "train.threads=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").is_file() and (out / "adapter").is_dir()
    bad = CliRunner().invoke(app, ["sft", str(base), "--data", str(DATA), "-o", str(out), "--method", "qlora"])
    assert bad.exit_code == 2 and "choose one of full, lora, prefix" in bad.output
    typo = CliRunner().invoke(app, ["sft", str(base), "--data", str(DATA), "-o", str(out), "train.steps=3"])
    assert typo.exit_code == 2 and "unknown key 'train.steps'" in typo.output


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_a_crashed_run_resumes_to_the_uninterrupted_weights(base, tmp_path, monkeypatch, method):
    """A crash after the step-6 checkpoint, then the same call again: the run resumes from that checkpoint (adapter
    or prefix included) and ends with exactly the weights of a run that was never interrupted."""
    import lmforge.finetune.sft as sft_module
    options = {"lora": {"lora_rank": 4, "lora_alpha": 8}, "prefix": {"prefix_length": 4}}
    cfg = _cfg(max_steps=12, ckpt_every=6, eval_every=6)
    run = lambda out: sft_on_file(base, DATA, out, cfg, method=method, limit=40, **options.get(method, {}))  # noqa: E731
    reference = run(tmp_path / "reference")
    real, calls = sft_module.sft_loss, []

    def crashing(model, batch, ctx=None):
        calls.append(1)
        if len(calls) == 9:  # step 9: after the step-6 checkpoint
            raise RuntimeError("simulated crash")
        return real(model, batch, ctx)

    monkeypatch.setattr(sft_module, "sft_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed")
    monkeypatch.setattr(sft_module, "sft_loss", real)
    resumed = run(tmp_path / "crashed")
    assert resumed["resumed_from"] == 6 and resumed["heldout_loss_after"] == reference["heldout_loss_after"]
    a, b = (load_file(str(tmp_path / d / "final/model.safetensors")) for d in ("reference", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    extra = {"lora": "adapter/adapter.safetensors", "prefix": "prefix/prefix.safetensors"}.get(method)
    if extra:
        a, b = (load_file(str(tmp_path / d / extra)) for d in ("reference", "crashed"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncation_warning_names_the_split_and_the_share(base, caplog):
    from lmforge.finetune.sft import render_pack

    tok = load_checkpoint_tokenizer(base)
    convs = read_conversations(INSTRUCT_DATA, limit=10)[0]
    lengths = [len(render(tok, c, "assistant")[0]) for c in convs]
    seq_len = sorted(lengths)[5]  # about half of them are longer
    with caplog.at_level("WARNING", logger="lmforge.finetune.sft"):
        render_pack(tok, convs, "assistant", seq_len, split="held-out")
    longer = sum(n > seq_len for n in lengths)
    said = [r.getMessage() for r in caplog.records if r.name == "lmforge.finetune.sft"]
    assert said == [f"held-out: {longer} of 10 conversations are longer than seq_len={seq_len} tokens "
                               "and lose their end"]  # fmt: skip
