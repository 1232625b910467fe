"""PPO: GAE, whitening, the clipped losses and the KL controller against hand-computed values; the policy with its
value head; training (the reward rises on a toy task, resume is bit-identical, final/ is a plain policy)."""

import math

import pytest
import torch

from lmforge.align.ppo import (
    AdaptiveKL,
    PolicyWithValue,
    PPOLoss,
    explained_variance,
    gae,
    ppo_token_losses,
    token_rewards,
    whiten,
)
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import IGNORE_INDEX

# One row: a prompt position, three reply tokens, one padding position.
MASK = torch.tensor([[False, True, True, True, False]])
VALUES = torch.tensor([[9.0, 0.5, 0.2, -0.1, 7.0]])
REWARDS = torch.tensor([[5.0, 0.0, 0.0, 1.0, 5.0]])  # off-mask rewards must not leak in


def test_gae_matches_the_hand_computed_recursion():
    adv, ret = gae(REWARDS * MASK, VALUES, MASK, gamma=0.9, lam=0.8)
    # A3 = 1 - (-0.1); A2 = (0 + 0.9 * -0.1 - 0.2) + 0.72 A3; A1 = (0 + 0.9 * 0.2 - 0.5) + 0.72 A2
    a3 = 1.1
    a2 = -0.29 + 0.72 * a3
    a1 = -0.32 + 0.72 * a2
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 0.5, a2 + 0.2, a3 - 0.1, 0.0], abs=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    adv, ret = gae(REWARDS * MASK, VALUES, MASK, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.5, 0.8, 1.1, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 0.0], abs=1e-6)


def test_gae_rows_end_where_their_reply_ends():
    """A short reply's episode ends at its own last token: the next row's values and the padding do not leak."""
    mask = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    values = torch.tensor([[9.0, 0.5, 0.2, -0.1, 7.0], [9.0, 0.25, 3.0, 3.0, 3.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0]])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[1].tolist() == pytest.approx([0.0, 1.75, 0.0, 0.0, 0.0])
    assert adv[0, 3] == pytest.approx(1.1)


def test_token_rewards_put_the_kl_penalty_on_every_reply_token_and_the_score_on_the_last():
    logps = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, -9.0]])
    rewards = token_rewards(torch.tensor([3.0]), logps, ref, MASK, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1, 3.0, 0.0])


def test_whitening_over_the_masked_positions():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0, -50.0]])
    # mean 2, unbiased variance 1 over the three reply tokens; off-mask positions become 0
    assert whiten(x, MASK)[0].tolist() == pytest.approx([0.0, -1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, MASK, shift_mean=False)[0].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0, 0.0], abs=1e-6)
    big = torch.randn(4, 50) * 7 + 3
    mask = torch.rand(4, 50) > 0.3
    w = whiten(big, mask)[mask]
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-5) and float(w.var()) == pytest.approx(1.0, abs=1e-4)


def test_clipped_policy_and_value_losses_match_hand_computed_values():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))  # ratios
    adv = torch.tensor([[2.0, -1.0, 1.0, 1.0]])
    values, old_values, returns = torch.tensor([[0.5, 0.1, -0.5, 2.0]]), torch.zeros(1, 4), torch.ones(1, 4)
    t = ppo_token_losses(logps, old, values, old_values, adv, returns, mask, cliprange=0.2, cliprange_value=0.2)
    # ratio 1.5, A 2: max(-3, -2 * 1.2) = -2.4 (clipped); ratio 0.5, A -1: max(0.5, 0.8) = 0.8 (clipped);
    # ratio 1.1, A 1: -1.1 inside the range; ratio 0.5, A 1: max(-0.5, -0.8) = -0.5 (not clipped: plain is larger)
    assert t.policy[0].tolist() == pytest.approx([-2.4, 0.8, -1.1, -0.5])
    assert t.policy_clipped[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # V 0.5 -> clipped to 0.2: 0.5 max(0.25, 0.64); V 0.1 inside: 0.5 * 0.81; V -0.5 -> -0.2: 0.5 max(2.25, 1.44);
    # V 2 -> 0.2: 0.5 max(1, 0.64)
    assert t.value[0].tolist() == pytest.approx([0.32, 0.405, 1.125, 0.5])
    assert t.value_clipped[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    off = ppo_token_losses(logps, old, values, old_values, adv, returns, torch.zeros_like(mask), 0.2, 0.2)
    assert float(off.policy.abs().sum() + off.value.abs().sum()) == 0.0


def test_adaptive_kl_follows_ziegler_and_a_fixed_coefficient_stays():
    kl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert kl.update(9.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # error 0.5 clipped to 0.2
    assert kl.update(5.7, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.05 * 64 / 10000))
    fixed = AdaptiveKL(0.1)
    assert fixed.update(100.0, 64) == 0.1
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKL(0.1, target=0.0)


def test_explained_variance():
    returns = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0]])
    assert explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    mean = torch.full_like(returns, 7 / 3)
    assert explained_variance(mean, returns, MASK) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), MASK))


@pytest.fixture
def policy():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=40, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                     max_seq_len=32)  # fmt: skip
    return Transformer(args)


def test_the_value_head_shares_one_pass_and_the_logits_are_the_policys(policy):
    model = PolicyWithValue(policy)
    ids = torch.randint(0, 40, (3, 9))
    logits, values = model(ids)
    assert torch.equal(logits, policy(ids))
    assert values.shape == (3, 9) and values.dtype == torch.float32 and float(values.detach().abs().sum()) == 0.0
    values.sum().backward()  # the zero head still gets a gradient: the hidden states
    assert float(model.value_head.weight.grad.abs().sum()) > 0


def test_ppo_loss_at_the_rollouts_own_policy_is_minus_the_mean_advantage_plus_the_value_loss(policy):
    """With old log-probs equal to the current ones, every ratio is 1: the policy loss is -mean(A) over the reply
    tokens and the value loss 0.5 mean((V - R)^2); the gradient of the policy part is the policy gradient."""
    from lmforge.align.rollout import logits_token_stats

    model = PolicyWithValue(policy)
    ids = torch.randint(0, 40, (2, 8))
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 3:7], labels[1, 3:5] = ids[0, 4:8], ids[1, 4:6]
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        logits, _ = model(ids)
        old = logits_token_stats(logits, labels, 0.7)[0]
    adv = torch.randn(2, 8) * mask
    returns = torch.randn(2, 8) * mask
    batch = {"input_ids": ids, "labels": labels, "old_logps": old, "old_values": torch.zeros(2, 8), "advantages": adv,
             "returns": returns, "stats": {"reward": torch.tensor(0.25)}}  # fmt: skip
    loss, metrics = PPOLoss(temperature=0.7, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)(model, batch)
    n = mask.sum()
    expected_vf = 0.5 * float((returns**2 * mask).sum() / n)  # values are 0 at the start
    assert float(loss.detach()) == pytest.approx(float(-(adv * mask).sum() / n) + 0.5 * expected_vf, abs=1e-6)
    assert float(metrics["value_loss"]) == pytest.approx(expected_vf, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(metrics["reward"]) == 0.25
    assert 0 < float(metrics["entropy"]) <= math.log(40) + 1e-5


# --- training -----------------------------------------------------------------------------------------------------

WORDS = ["Give three tips", "Name a color", "Write a list", "Describe water", "Make a plan", "Explain time",
         "List plants", "Say hello", "Count to ten", "Find a word", "Draw a cat", "Sing a song"]  # fmt: skip


def items(words=WORDS):
    from lmforge.align.prompts import PromptItem
    from lmforge.finetune.data import Message

    return [PromptItem([Message("user", w)], {"id": str(i), "source": f"words:{i}"}) for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    """A chat model that answers any prompt with "y" or "n" at even odds and then ends its turn (its residual
    branches zeroed, so each next token depends on the current one alone): a two-armed bandit it already plays,
    so a few PPO steps show the reward moving, and the KL penalty has a turn ending to keep."""
    from helpers import make_chain, tiny_chat_model
    from lmforge.finetune.data import Message
    from lmforge.finetune.template import prompt_ids
    from lmforge.model.io import load_checkpoint_tokenizer, load_model, save_model

    root = tmp_path_factory.mktemp("ppo")
    ckpt = tiny_chat_model(root)
    model, args = load_model(ckpt)
    tok = load_checkpoint_tokenizer(ckpt)
    assistant = prompt_ids(tok, [Message("user", "x")])[-1]
    (yes,), (no,), stop = tok.encode("y"), tok.encode("n"), tok.stop_ids[0]
    make_chain(model, {assistant: yes, yes: stop})
    with torch.no_grad():
        model.lm_head.weight[no] = model.lm_head.weight[yes]
        emb = model.model.embed_tokens.weight
        model.lm_head.weight[stop] += 10 * emb[no] / emb[no].norm()
    return save_model(root / "coin", model, args, root / "tok.json")


def says_yes(samples):
    values = [float(s.completion.startswith("y")) for s in samples]
    return values, {"yes": values}


def train_cfg(**kw):
    from lmforge.align.ppo_config import PPOTrainConfig

    base = {"max_steps": 12, "lr": 2e-3, "eval_every": 100, "ckpt_every": 100, "compile": False, "threads": 1}
    return PPOTrainConfig(**{**base, **kw})


def run(ckpt, out, train, **kw):
    from lmforge.align.ppo_train import train_ppo

    options = {"reward": says_yes, "rollout_size": 16, "minibatches": 2, "epochs": 2, "max_new_tokens": 3,
               "kl_coef": 0.05, "seed": 0, **kw}  # fmt: skip
    return train_ppo(ckpt, items()[:8], items()[8:], out, train, **options)


def records(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(coin, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_run") / "out"
    return out, run(coin, out, train_cfg())


def yes_probability(checkpoint) -> float:
    """The mean chance over the held-out prompts that the reply starts with "y"."""
    from lmforge.finetune.template import prompt_ids
    from lmforge.model.io import load_checkpoint_tokenizer, load_model

    model, _ = load_model(checkpoint)
    tok = load_checkpoint_tokenizer(checkpoint)
    (yes,) = tok.encode("y")
    with torch.no_grad():
        return float(sum(torch.softmax(model(torch.tensor([prompt_ids(tok, item.messages)]))[0, -1], -1)[yes]
                         for item in items()[8:]) / len(items()[8:]))  # fmt: skip


def test_ppo_raises_the_reward_of_a_toy_task_and_keeps_the_turn_ending(coin, trained):
    out, metrics = trained
    recs = records(out)
    # The expected reward is the chance of "y" first: about 1/2 at the start (two equal logits), well above after.
    assert yes_probability(coin) == pytest.approx(0.5, abs=0.01)
    assert yes_probability(out / "final") > 0.75
    per_rollout = [recs[i]["reward"] for i in (0, 4, 8)]  # 4 steps per rollout: 2 minibatches x 2 epochs
    assert per_rollout[-1] > per_rollout[0], per_rollout
    assert metrics["heldout_reward_after"] > metrics["heldout_reward_before"]
    assert all(r["ended_turn"] == 1.0 and r["response_length"] == 2.0 for r in recs)  # "y"/"n", then the turn ends
    first = recs[0]
    assert first["kl"] == 0.0 and first["kl_coef"] == pytest.approx(0.05)  # rollout 1: the policy is the reference
    assert first["clip_fraction"] == 0.0 and first["approx_kl"] < 1e-10  # ratio 1 before any update
    assert recs[1]["clip_fraction"] >= 0 and 0 < recs[-1]["kl"] < 1.0
    for name in ("value_loss", "value_clip_fraction", "entropy", "explained_variance", "policy_loss", "reward/yes"):
        assert name in first


def test_final_is_a_plain_policy_and_checkpoints_keep_the_value_head(trained):
    from safetensors.torch import load_file

    from lmforge.model.io import load_model

    out, _ = trained
    policy, _ = load_model(out / "final")
    final = load_file(str(out / "final" / "model.safetensors"))
    assert not any("value_head" in k for k in final) and set(final) == set(policy.state_dict())
    live = load_file(str(next((out / "checkpoints").iterdir()) / "model.safetensors"))
    assert {"value_head.weight", "value_head.bias"} <= set(live)
    assert all(torch.equal(final[k], live[f"policy.{k}"]) for k in final)  # the last checkpoint is the last step


def test_a_run_killed_between_minibatches_resumes_to_the_uninterrupted_weights(coin, tmp_path, monkeypatch):
    """A crash in step 5, after the step-3 checkpoint taken between two minibatches of the first rollout: the same
    call resumes with that pending rollout (its tensors, the minibatch cursor, the KL coefficient) and the sampling
    state, and ends with the uninterrupted run's weights, records and held-out figures."""
    import json

    from safetensors.torch import load_file

    from lmforge.align import ppo_train

    train = train_cfg(max_steps=6, ckpt_every=3, eval_every=3)
    options = {"target_kl": 0.01, "kl_horizon": 100}  # the adaptive coefficient moves, so it must resume too
    reference = run(coin, tmp_path / "reference", train, **options)
    real, calls = ppo_train.PPOLoss, []

    class Crashing(real):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("simulated crash")
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(ppo_train, "PPOLoss", Crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(coin, tmp_path / "crashed", train, **options)
    monkeypatch.setattr(ppo_train, "PPOLoss", real)
    state = json.loads((tmp_path / "crashed" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    loader = json.dumps(state)
    assert '"cursor": 3' in loader and '"pending": {' in loader  # 3 of the rollout's 4 minibatches taken
    resumed = run(coin, tmp_path / "crashed", train, **options)
    assert resumed["resumed_from"] == 3
    a, b = (load_file(str(tmp_path / d / "final/model.safetensors")) for d in ("reference", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}  # noqa: E731
    assert [same(r) for r in records(tmp_path / "reference")] == [same(r) for r in records(tmp_path / "crashed")]
    assert records(tmp_path / "reference")[-1]["kl_coef"] != pytest.approx(0.05)  # the controller did move
    assert reference["final_eval_metrics"] == resumed["final_eval_metrics"]


def test_a_reward_model_scores_the_rollout_tokens_as_it_scores_the_rendered_conversation(coin, tmp_path):
    """With the policy's tokenizer the reward model reads the rollout's own ids; they are the tokens the chat
    template renders for the prompt and the reply, so both paths give the same scores."""
    from lmforge.align.ppo_train import encode_prompts, reward_model_scorer
    from lmforge.align.reward_model import RewardModel, load_reward_model, score_conversations
    from lmforge.align.rollout import sample_rollout
    from lmforge.finetune.data import Message
    from lmforge.model.io import load_checkpoint_tokenizer, load_model

    torch.manual_seed(0)  # the reward model: the untouched tiny model (a trunk that reads the whole sequence)
    RewardModel.from_checkpoint(coin.parent / "ckpt").save(tmp_path / "rm", tokenizer_dir=coin)
    tok = load_checkpoint_tokenizer(coin)
    policy, _ = load_model(coin)
    prompts, kept, skipped = encode_prompts(tok, items(), room=120)
    assert len(kept) == len(items()) and skipped.count == 0
    rollout = sample_rollout(policy, tok, prompts, list(range(len(prompts))), 1, 3, 1.0, seed=0)
    assert all(rollout.ended)
    scores, parts = reward_model_scorer(tmp_path / "rm", coin)(rollout, kept)
    convs = [[*item.messages, Message("assistant", text)] for item, text in zip(kept, rollout.texts)]
    rendered, index, _ = score_conversations(load_reward_model(tmp_path / "rm"), tok, convs)
    assert index == list(range(len(kept))) and parts == {}
    assert torch.allclose(scores, rendered, atol=1e-6) and float(scores.std()) > 0


def test_prompts_without_room_for_a_reply_are_skipped_and_counted(coin):
    from lmforge.align.ppo_train import encode_prompts
    from lmforge.model.io import load_checkpoint_tokenizer

    tok = load_checkpoint_tokenizer(coin)
    long = items([" ".join(["word"] * 200)])[0]
    ids, kept, skipped = encode_prompts(tok, [*items()[:2], long], room=100)
    assert len(ids) == len(kept) == 2 and skipped.count == 1
    assert skipped.examples[0].startswith("words:0: prompt too long")


def write_prompts(path, words=WORDS):
    import json

    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words), encoding="utf-8")
    return path


def test_the_ppo_verb_trains_with_a_reward_model_or_reward_functions(coin, tmp_path):
    import json

    from typer.testing import CliRunner

    from lmforge.align.reward_model import RewardModel
    from lmforge.cli import app
    from lmforge.model.io import load_model

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    torch.manual_seed(0)
    RewardModel.from_checkpoint(coin.parent / "ckpt").save(tmp_path / "rm", tokenizer_dir=coin)
    small = ["ppo.rollout_size=4", "ppo.minibatches=2", "ppo.epochs=1", "ppo.max_new_tokens=3", "ppo.val_fraction=0.25",
             "train.max_steps=4", "train.compile=false", "train.threads=1"]  # fmt: skip
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ppo", str(coin), "--prompts", str(prompts), "--reward-model",
                                      str(tmp_path / "rm"), "-o", str(out), "ppo.kl_coef=0.1", *small])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "9 training prompts, 3 held out (0 too long); scored by" in result.output and "4 steps" in result.output
    marker = json.loads((out / ".lmforge").read_text())
    assert marker["job"]["config"]["kl_coef"] == 0.1 and marker["job"]["config"]["train"]["max_steps"] == 4
    load_model(out / "final")
    recs = records(out)
    assert len(recs) == 4 and recs[0]["reward"] != recs[2]["reward"]  # steps 1-2 and 3-4: two rollouts
    functions = CliRunner().invoke(app, ["ppo", str(coin), "--prompts", str(prompts), "--reward", "ends_turn=2",
                                         "-o", str(tmp_path / "fn"), *small])  # fmt: skip
    assert functions.exit_code == 0, functions.output
    assert records(tmp_path / "fn")[0]["reward"] == 2.0 and records(tmp_path / "fn")[0]["reward/ends_turn"] == 1.0
    bad = CliRunner().invoke(app, ["ppo", str(coin), "--prompts", str(prompts), "--reward", "ends_turn=lots", "-o",
                                   str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2 and "expected NAME=WEIGHT" in bad.output
    neither = CliRunner().invoke(app, ["ppo", str(coin), "--prompts", str(prompts), "-o", str(tmp_path / "none")])
    assert neither.exit_code != 0 and "exactly one source of scores" in str(neither.exception or neither.output)


def _ppo_command(ckpt, prompts, rm, out, nproc):
    import sys

    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "lmforge.cli", "ppo", str(ckpt), "--prompts", str(prompts), "--reward-model", str(rm),
            "-o", str(out), "ppo.rollout_size=8", "ppo.minibatches=2", "ppo.epochs=2", "ppo.max_new_tokens=3",
            "ppo.val_fraction=0.25", "ppo.target_kl=0.01", "ppo.kl_horizon=100", "train.max_steps=6",
            "train.lr=2e-3", "train.ckpt_every=3", "train.eval_every=3", "train.compile=false"]  # fmt: skip


@pytest.mark.slow  # about 40 s on 2 cores: torchrun starts two interpreters
def test_two_ranks_match_one_process(coin, tmp_path):
    """Every rank makes the whole rollout and trains on its own rows of each minibatch: the losses, the rollout
    measures, the held-out reward and the final weights match one process."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from lmforge.align.reward_model import RewardModel

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    torch.manual_seed(0)
    RewardModel.from_checkpoint(coin.parent / "ckpt").save(tmp_path / "rm", tokenizer_dir=coin)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    for nproc in (1, 2):
        command = _ppo_command(coin, prompts, tmp_path / "rm", tmp_path / f"n{nproc}", nproc)
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                                env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:]
    one, two = records(tmp_path / "n1"), records(tmp_path / "n2")
    assert [r["step"] for r in two] == list(range(1, 7))
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
        for name in ("reward", "kl", "kl_coef", "clip_fraction", "value_loss", "heldout_reward"):
            assert x.get(name) == pytest.approx(y.get(name), abs=1e-5), (x["step"], name)
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("n1", "n2"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert not any("value_head" in k for k in b)


def test_ppo_reward_model_reward_names_the_runs_reward_stage_and_its_files_fingerprint_the_stage(tmp_path):
    from pathlib import Path

    from lmforge import registry
    from lmforge.align.ppo_config import PPOConfig
    from lmforge.align.ppo_stage import reward_model_path
    from lmforge.recipe import validate_recipe

    cfg = PPOConfig(reward_model="reward")
    assert reward_model_path(cfg, tmp_path) == tmp_path / "reward" / "final"
    with pytest.raises(ValueError, match="outside `lmforge run`"):
        reward_model_path(cfg, None)
    assert reward_model_path(PPOConfig(reward_model="x/rm"), None) == Path("x/rm")
    assert reward_model_path(PPOConfig(rewards={"ends_turn": 1.0}), tmp_path) is None
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    recipe = validate_recipe({"name": "r", "run_dir": str(tmp_path), "ppo": {"reward_model": "reward",
                                                                             "prompts": str(prompts)}})  # fmt: skip
    sources = registry.get("ppo").sources
    assert set(sources(recipe)) == {"prompts"}  # the reward stage has not run yet
    rm = tmp_path / "r" / "reward" / "final"
    rm.mkdir(parents=True)
    (rm / "model.safetensors").write_bytes(b"one")
    before = sources(recipe)["reward_model"]
    (rm / "model.safetensors").write_bytes(b"other")
    assert sources(recipe)["reward_model"] != before  # a retrained reward model re-runs ppo


def test_the_report_section_names_the_held_out_reward_before_and_after(trained):
    from lmforge import registry
    from lmforge.registry import ReportContext
    from lmforge.report.format import fmt

    out, metrics = trained
    manifest = {"metrics": {**metrics, "prompts_file": "prompts.jsonl", "scored_by": "says_yes"}}
    lines = registry.get("ppo").report(ReportContext(stage_dir=out, manifest=manifest, root=out, out=out))
    text = "\n".join(lines)
    assert lines[0] == "## PPO" and "- prompts: prompts.jsonl" in text
    assert "8 training prompts, 4 held out (0 too long); scored by says_yes; 12 steps" in text
    assert (f"held-out reward: {fmt(metrics['heldout_reward_before'])} before, "
            f"{fmt(metrics['heldout_reward_after'])} after") in text  # fmt: skip
    assert f"last rollout: reward {fmt(metrics['final_metrics']['reward'])}" in text
