"""Rewards: exact values on hand-written replies (MBPP solutions to real items, doctests, GSM8K answers, length),
weights combined exactly, clear errors for rewards that cannot apply, and generated code contained by the sandbox
in few sandbox calls."""

import time
from pathlib import Path

import pytest

import lmforge.eval.sandbox_batch as sandbox_batch
from lmforge.align.prompts import PromptItem, read_prompts
from lmforge.align.rewards import REWARDS, Sample, build_reward, chrf, final_number, reply_code
from lmforge.finetune.data import Message

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
CODE_PROMPT = 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    5\n    >>> add(-1, 1)\n    0\n    """'
DOC_ITEM = PromptItem([Message("user", CODE_PROMPT)], {"code_prompt": CODE_PROMPT, "source": "m.py:1:add"})
MATH_ITEM = PromptItem([Message("user", "How many?")], {"answer": "1234", "source": "gsm.jsonl:3"})


def sample(item: PromptItem, reply: str, ended: bool = True, tokens: int = 10) -> Sample:
    return Sample(item, reply, ended, tokens)


@pytest.fixture(scope="module")
def mbpp():
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    items, _ = read_prompts(DATA / "code/mbpp.jsonl")
    return {item.meta["id"]: item for item in items}


def test_mbpp_correct_wrong_and_partial_solutions(mbpp):
    item = mbpp["mbpp/2"]  # similar_elements: three asserts comparing tuples
    replies = [
        "Here it is:\n```python\ndef similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n```\nDone.",
        "def similar_elements(a, b):\n    return tuple(sorted(set(a) | set(b)))\n",  # the union: every assert fails
        "def similar_elements(a, b):\n    return (4, 5)\n",  # right for the first assert only
        "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b))\n",  # does not parse
        "def other_name(a, b):\n    return tuple(sorted(set(a) & set(b)))\n",  # NameError in every assert
    ]
    reward = build_reward({"mbpp_tests": 1.0})
    totals, parts = reward([sample(item, r) for r in replies])
    assert parts["mbpp_tests"] == [1.0, 0.0, 1 / 3, 0.0, 0.0]
    assert totals == parts["mbpp_tests"]
    assert reward.status_counts() == {"mbpp_tests/failed": 4, "mbpp_tests/passed": 1}


def test_mbpp_setup_code_runs_after_the_reply_and_sanitized_imports(mbpp):
    tree = mbpp["mbpp/367"]  # the setup builds trees of the reply's own Node class
    sanitized, _ = read_prompts(DATA / "code/sanitized-mbpp.json")
    sphere = next(i for i in sanitized if i.meta["id"] == "mbpp/82")  # the asserts use math, imported by the setup
    totals, _ = build_reward({"mbpp_tests": 1.0})([sample(tree, tree.meta["reference"]),
                                                   sample(sphere, sphere.meta["reference"])])  # fmt: skip
    assert totals == [1.0, 1.0]


def test_doctests_pass_fail_and_not_run():
    replies = ["    return a + b\n", "    return a - b\n", "    return a +\n", "    return a + b\n"]
    reward = build_reward({"doctests": 1.0})
    _, parts = reward([sample(DOC_ITEM, replies[0]), sample(DOC_ITEM, replies[1]), sample(DOC_ITEM, replies[2]),
                       sample(DOC_ITEM, replies[3], ended=False)])  # fmt: skip
    assert parts["doctests"] == [1.0, 0.0, 0.0, 1.0]  # the doctest reward does not ask for an ended turn
    assert reward.status_counts() == {"doctests/failed": 1, "doctests/not_run": 1, "doctests/passed": 2}


def test_completes_function_ends_turn_and_code_parses():
    replies = [("    return a + b\n", True), ("    return a + b\n", False), ("    return a +\n", True),
               ("    return a\n\nprint('top level')\n", True),  # wanders off: no longer one indented body
               ("```python\ndef add(a, b):\n    return a + b\n```", True)]  # a whole function: parses alone
    _, parts = build_reward({"completes_function": 1, "ends_turn": 1, "code_parses": 1})(
        [sample(DOC_ITEM, r, ended) for r, ended in replies])
    assert parts == {"completes_function": [1.0, 0.0, 0.0, 0.0, 0.0], "ends_turn": [1.0, 0.0, 1.0, 1.0, 1.0],
                     "code_parses": [1.0, 1.0, 0.0, 0.0, 1.0]}  # fmt: skip


def test_chrf_by_hand():
    # "ab" against "abc": orders 1-3 (the reference's length); P = (2/2 + 1/1 + 0) / 3 = 2/3,
    # R = (2/3 + 1/2 + 0) / 3 = 7/18; F2 = 5PR / (4P + R) = 14/33, F1 = 2PR / (P + R) = 28/57
    assert chrf("ab", "abc") == pytest.approx(14 / 33)
    assert chrf("ab", "abc", beta=1.0) == pytest.approx(28 / 57)
    assert chrf("ab", "abc", order=2) == pytest.approx(7 / 11)  # P = 1, R = 7/12
    assert chrf("aa", "a") == pytest.approx(5 / 6)  # a repeated "a" matches once: P = 1/2, R = 1
    assert chrf("  a b\n\tc", "abc") == pytest.approx(1.0)  # whitespace does not count
    assert chrf("", "abc") == chrf("abc", " ") == chrf("xyz", "abc") == 0.0


def test_reference_similarity_scores_the_body_against_the_reference():
    item = PromptItem(DOC_ITEM.messages, {**DOC_ITEM.meta, "reference": "    return a + b"})
    replies = ["    return a + b\n", "    return a - b\n", "    return self\n", ""]
    _, parts = build_reward({"reference_similarity": 1.0})([sample(item, r) for r in replies])
    same, minus, hack, empty = parts["reference_similarity"]
    assert same == pytest.approx(1.0) and empty == 0.0
    assert 0 < hack < minus < 1  # `return self` completes a function as well as the real body, but scores lower
    assert minus == pytest.approx(chrf("returna-b", "returna+b"))
    _, f1 = build_reward({"reference_similarity": 1.0}, chrf_beta=1.0)([sample(item, "ab")])
    assert f1["reference_similarity"] == [chrf("ab", "returna+b", beta=1.0)]


def test_reply_code_takes_the_first_fenced_block():
    assert reply_code("Sure:\n```python\nx = 1\n```\nand\n```\ny = 2\n```") == "x = 1\n"
    assert reply_code("```py\nx = 1\n") == "x = 1\n"  # cut off inside the block
    assert reply_code("x = 1") == "x = 1"


@pytest.mark.parametrize("reply, number", [
    ("The total is $1,234.", "1234"),
    ("She owes -5 dollars, so the balance is -5", "-5"),
    ("pages 3-4", "4"),  # a dash between numbers is no minus sign
    ("It costs 3.50", "3.5"),
    ("2 + 70 = 72\n#### 72", "72"),
    ("#### 1,080.00 then 5 more words 6", "1080"),  # the first number after the last mark
    ("The answer is 18. Check: 9 * 2 = 18, and 3", "18"),
    ("the ANSWER IS -0.0", "0"),
    ("no number here", None),
    ("#### none", None),
])  # fmt: skip
def test_final_number(reply, number):
    assert final_number(reply) == number


def test_gsm8k_answer_exact():
    replies = ["So $1,234.", "1234.0", "#### 1234", "1,235", "The answer is 1234 and not 12"]
    _, parts = build_reward({"gsm8k_answer": 1.0})([sample(MATH_ITEM, r) for r in replies])
    assert parts["gsm8k_answer"] == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_length_modes():
    samples = [sample(MATH_ITEM, "x", tokens=n) for n in (0, 5, 10, 15, 30)]
    _, target = build_reward({"length": 1.0}, length_target=10)(samples)
    _, penalty = build_reward({"length": 1.0}, length_target=10, length_mode="penalty", length_penalty=0.5)(samples)
    assert target["length"] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert penalty["length"] == [0.0, 0.0, 0.0, -2.5, -10.0]


def test_weights_combine_exactly():
    reward = build_reward({"ends_turn": 0.5, "gsm8k_answer": 2.0, "length": -0.25}, length_target=8)
    totals, parts = reward([sample(MATH_ITEM, "#### 1234", True, 4), sample(MATH_ITEM, "#### 1", False, 8)])
    assert parts == {"ends_turn": [1.0, 0.0], "gsm8k_answer": [1.0, 0.0], "length": [0.5, 1.0]}
    assert totals == [0.5 * 1.0 + 2.0 * 1.0 - 0.25 * 0.5, -0.25]


def test_build_errors():
    with pytest.raises(ValueError, match="unknown reward 'helpful'; expected one of"):
        build_reward({"helpful": 1.0})
    with pytest.raises(ValueError, match="no rewards given"):
        build_reward({})
    with pytest.raises(ValueError, match="option 'timeout_s' is taken by none of the rewards"):
        build_reward({"ends_turn": 1.0}, timeout_s=1.0)
    with pytest.raises(ValueError, match="reward 'length' needs length_target"):
        build_reward({"length": 1.0})
    with pytest.raises(ValueError, match="length_mode must be 'target' or 'penalty'"):
        build_reward({"length": 1.0}, length_target=4, length_mode="exact")
    assert set(REWARDS) >= {"ends_turn", "completes_function", "code_parses", "doctests", "mbpp_tests",
                            "gsm8k_answer", "length", "reference_similarity"}  # fmt: skip


@pytest.mark.parametrize("name, item, needs", [
    ("mbpp_tests", MATH_ITEM, "no meta 'tests'"),
    ("gsm8k_answer", DOC_ITEM, "no meta 'answer'"),
    ("completes_function", MATH_ITEM, "no meta 'code_prompt'"),
    ("doctests", MATH_ITEM, "no meta 'code_prompt'"),
    ("reference_similarity", DOC_ITEM, "no meta 'reference'"),
    ("doctests", PromptItem([], {"code_prompt": 'def f():\n    """No examples."""', "source": "m.py:9:f"}),
     "no >>> examples|has >>> examples"),
])  # fmt: skip
def test_a_reward_that_cannot_apply_names_itself_and_the_item(name, item, needs):
    reward = build_reward({name: 1.0})
    with pytest.raises(ValueError, match=f"reward '{name}' cannot score the prompt at {item.meta['source']}: .*"
                                         f"({needs})"):  # fmt: skip
        reward([sample(item, "    return 1\n")])


def test_generated_code_is_contained_and_batched(mbpp, tmp_path, monkeypatch):
    calls = []
    real = sandbox_batch.run_python
    monkeypatch.setattr(sandbox_batch, "run_python", lambda *a, **k: calls.append(1) or real(*a, **k))
    item, target = mbpp["mbpp/2"], tmp_path / "escaped"
    good = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
    replies = [f"import os; os.system('touch {target}')\n" + good, "while True:\n    pass\n", good]
    reward = build_reward({"mbpp_tests": 1.0}, timeout_s=0.5)
    _, parts = reward([sample(item, r) for r in replies])
    assert parts["mbpp_tests"] == [0.0, 0.0, 1.0] and not target.exists()
    assert reward.status_counts() == {"mbpp_tests/blocked": 1, "mbpp_tests/passed": 1, "mbpp_tests/timeout": 1}
    calls.clear()
    samples = [sample(mbpp[f"mbpp/{i}"], mbpp[f"mbpp/{i}"].meta["reference"]) for i in range(2, 66)]
    start = time.perf_counter()
    totals, _ = build_reward({"mbpp_tests": 1.0}, batch_size=32)(samples)
    assert totals == [1.0] * 64
    assert len(calls) == 2 and time.perf_counter() - start < 20  # about 0.5 s here: 2 interpreters, not 64
