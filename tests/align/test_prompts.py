"""Prompt readers: MBPP (both files), GSM8K, messages and prompt records on the real shared files and on records
written here; bad records counted with their location; the sft stage's docstring pairs as prompts."""

import json
from pathlib import Path

import pytest

from lmforge.align.prompts import MBPP_INSTRUCTION, docstring_prompts, entry_point, gsm8k_answer, read_prompts
from lmforge.data.code_pairs import function_pairs
from lmforge.finetune.code_pairs import conversation
from lmforge.finetune.data import BadRecord, Message

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@needs_data
@pytest.mark.parametrize("name, kept", [
    ("code/mbpp.jsonl", 974), ("code/sanitized-mbpp.json", 427),
    ("instruct/gsm8k_test.jsonl", 1319), ("instruct/gsm8k_train.jsonl", 7473),
])  # fmt: skip
def test_real_files_counts(name, kept):
    items, skipped = read_prompts(DATA / name)
    assert (len(items), skipped.count) == (kept, 0)
    assert all(item.messages[-1].role == "user" for item in items)
    assert len({item.meta["source"] for item in items}) == kept


@needs_data
def test_mbpp_item_fields():
    items, _ = read_prompts(DATA / "code/mbpp.jsonl", limit=2)
    item = items[1]
    tests = ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
             "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
             "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]  # fmt: skip
    assert item.messages == [Message("user", "Write a function to find the similar elements from the given two tuple "
                                             f"lists. {MBPP_INSTRUCTION}\n\n" + "\n".join(tests))]  # fmt: skip
    assert item.meta["tests"] == tests
    assert item.meta["id"] == "mbpp/2" and item.meta["entry_point"] == "similar_elements"
    assert item.meta["test_setup"] == "" and item.meta["source"] == f"{DATA / 'code/mbpp.jsonl'}:2"
    assert item.meta["reference"].startswith("def similar_elements(test_tup1, test_tup2):\n")


@needs_data
def test_mbpp_setup_code_and_sanitized_imports():
    items, _ = read_prompts(DATA / "code/mbpp.jsonl")
    tree = next(i for i in items if i.meta["id"] == "mbpp/367")
    assert tree.meta["test_setup"].startswith("root = Node(1) \nroot.left = Node(2)")
    assert "\r" not in tree.meta["test_setup"] and tree.meta["entry_point"] == "is_tree_balanced"
    sanitized, _ = read_prompts(DATA / "code/sanitized-mbpp.json", format="mbpp")
    sphere = next(i for i in sanitized if i.meta["id"] == "mbpp/82")
    assert sphere.meta["test_setup"] == "import math" and sphere.meta["entry_point"] == "volume_sphere"
    assert sphere.messages[0].content.startswith(f"Write a function to find the volume of a sphere. {MBPP_INSTRUCTION}")


@needs_data
def test_gsm8k_item_and_answers():
    items, _ = read_prompts(DATA / "instruct/gsm8k_train.jsonl", limit=2)
    assert items[0].messages[0].content.startswith("Natalia sold clips to 48 of her friends in April")
    assert [i.meta["answer"] for i in items] == ["72", "10"]
    test, _ = read_prompts(DATA / "instruct/gsm8k_test.jsonl")
    assert test[489].meta["answer"].startswith("-")  # line 490 holds a negative answer
    assert "," not in test[146].meta["answer"] and test[146].meta["answer"].isdigit()  # "1,xxx" on line 147


def test_gsm8k_answer_rule():
    assert gsm8k_answer("So 3 + 4 = 7.\n#### 1,080") == "1080"
    assert gsm8k_answer("a #### 3 b\n#### -12") == "-12"
    with pytest.raises(BadRecord, match="no final answer"):
        gsm8k_answer("The answer is 7")
    with pytest.raises(BadRecord, match="no final answer"):
        gsm8k_answer("#### seven")


def test_records_written_here_and_bad_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}], "answer": 4},
        {"messages": [{"role": "user", "content": "Hi"}], "id": "greet", "tests": ["assert True"]},
        {"messages": [{"role": "assistant", "content": "I start"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "{not json",
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "x"}], "answer": ["7"]},
    ])  # fmt: skip
    items, skipped = read_prompts(path)
    assert [i.messages for i in items] == [[Message("system", "Be brief."), Message("user", "2+2?")],
                                           [Message("user", "Hi")]]  # fmt: skip
    assert items[0].meta == {"answer": "4", "reference": "4", "source": f"{path}:1", "id": f"{path}:1"}
    assert items[1].meta == {"id": "greet", "tests": ["assert True"], "source": f"{path}:2"}
    assert skipped.count == 5
    assert skipped.by_reason == {"no user turn last": 1, "consecutive same role": 1, "invalid JSON": 1,
                                 "wrong type": 2}  # fmt: skip
    assert skipped.examples[0] == f"{path}:3: no user turn last: a prompt must end with the user's message"


def test_prompt_records_mbpp_and_gsm8k_bad_records(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi", "system": "Be kind."}, {"prompt": "  "}])
    items, skipped = read_prompts(prompts)
    assert items[0].messages == [Message("system", "Be kind."), Message("user", "Say hi")]
    assert skipped.by_reason == {"empty content": 1}
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": 1, "text": "t", "code": "def f(): pass", "test_list": [], "test_setup_code": ""},
        {"task_id": 2, "text": "t", "code": "def f(): pass", "test_list": ["assert g() == 1"], "test_setup_code": ""},
        {"task_id": 3, "text": "t", "code": "def f(): pass", "test_list": ["assert f() is None"],
         "test_setup_code": ""},
    ])  # fmt: skip
    items, skipped = read_prompts(mbpp)
    assert [i.meta["id"] for i in items] == ["mbpp/3"]
    assert skipped.by_reason == {"no tests": 1, "no entry point": 1}
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "it is 7"}, {"question": "q", "answer": 7}])
    items, skipped = read_prompts(gsm)
    assert not items and skipped.by_reason == {"no final answer": 1, "wrong type": 1}


def test_limit_format_and_missing_file(tmp_path):
    items, _ = read_prompts(DATA / "instruct/gsm8k_test.jsonl", limit=3) if DATA.is_dir() else ([None] * 3, None)
    assert len(items) == 3
    with pytest.raises(ValueError, match="unknown prompt format 'alpaca'"):
        read_prompts(tmp_path / "x.jsonl", format="alpaca")
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        read_prompts(tmp_path / "x.jsonl")


def test_entry_point_python2_reference_names_the_first_call():
    assert entry_point("def f(x):\n    print x\n", ["assert f(1) == len([1])"]) == "f"
    assert entry_point("def helper(): pass\ndef g(): pass", ["assert sorted(g()) == helper()"]) == "g"


def test_docstring_prompts_match_the_sft_user_turn():
    source = 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n'
    pairs = list(function_pairs(source, "m.py"))
    (item,) = docstring_prompts(pairs)
    assert item.messages == conversation(pairs[0])[:1]
    assert item.meta == {"id": pairs[0].id, "source": pairs[0].id, "code_prompt": pairs[0].prompt,
                         "reference": "    return a + b"}
    assert "return a + b" not in item.messages[0].content  # the reference body stays out of the prompt
    assert item.meta["code_prompt"] == 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    5\n    """'
