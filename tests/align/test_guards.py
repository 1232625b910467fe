"""RLGuard: a KL or reward past its limit, or not finite, stops the run (or only warns) with a message naming the
setting; measures within the limits pass. The KL estimators' own guarantees (>= 0 in expectation, exactly 0 when
policy equals reference) are tested in test_align_losses.py; the guard wired into GRPO in test_grpo.py."""

import logging

import pytest

from lmforge.align.guards import AlignmentDiverged, RLGuard


def test_within_the_limits_nothing_happens(caplog):
    guard = RLGuard("grpo", max_kl=0.5, max_reward=2.0)
    with caplog.at_level(logging.WARNING):
        assert guard.check(3, {"kl": 0.5, "reward": 2.0, "entropy": 9.0}) == []
        assert guard.check(4, {}) == []  # a run without a reference has no kl to check
    assert not caplog.records


def test_kl_past_max_kl_stops_naming_the_setting():
    guard = RLGuard("grpo", max_kl=0.5)
    with pytest.raises(AlignmentDiverged, match=r"step 7: kl 0\.75 exceeds grpo\.max_kl=0\.5: .*grpo\.beta") as err:
        guard.check(7, {"kl": 0.75, "reward": 100.0})  # no max_reward: any finite reward passes
    assert "grpo.on_blowup=warn" in str(err.value) and "reward" not in str(err.value).split("exceeds")[0]


def test_reward_past_max_reward_and_non_finite_measures_stop():
    with pytest.raises(AlignmentDiverged, match=r"reward 3 exceeds ppo\.max_reward=2\.0"):
        RLGuard("ppo", max_reward=2.0).check(1, {"reward": 3.0})
    with pytest.raises(AlignmentDiverged, match=r"kl is nan \(grpo\.max_kl=None\): the run has diverged"):
        RLGuard("grpo").check(1, {"kl": float("nan")})
    with pytest.raises(AlignmentDiverged, match=r"reward is inf"):
        RLGuard("grpo").check(1, {"reward": float("inf")})


def test_on_blowup_warn_only_warns_and_returns_the_messages(caplog):
    guard = RLGuard("grpo", max_kl=0.1, max_reward=1.0, on_blowup="warn")
    with caplog.at_level(logging.WARNING, logger="lmforge.align.guards"):
        found = guard.check(2, {"kl": 0.2, "reward": 1.5})
    assert len(found) == 1 and "grpo.max_kl=0.1" in found[0] and "grpo.max_reward=1.0" in found[0]
    assert "grpo.on_blowup=warn: training goes on" in caplog.text


def test_bad_on_blowup_is_refused():
    with pytest.raises(ValueError, match="grpo.on_blowup='ignore': expected stop or warn"):
        RLGuard("grpo", on_blowup="ignore")  # type: ignore[arg-type]


def test_kl_advice_names_the_sections_own_kl_weight():
    with pytest.raises(AlignmentDiverged, match=r"raise ppo\.kl_coef, or raise ppo\.max_kl"):
        RLGuard("ppo", max_kl=0.5, kl_setting="kl_coef").check(3, {"kl": 0.9})
    with pytest.raises(AlignmentDiverged, match=r"raise grpo\.beta, or raise grpo\.max_kl"):
        RLGuard("grpo", max_kl=0.5).check(3, {"kl": 0.9})
