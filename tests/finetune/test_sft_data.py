import json
import logging
from pathlib import Path

import pytest

from lmforge.data.readers import stdlib_root
from lmforge.finetune.data import FieldMap, Message, Skipped, read_conversations
from lmforge.finetune.template import CHAT_TEMPLATE_JINJA, IGNORE_INDEX, pack, prompt_ids, render
from lmforge.tokenizer import train_tokenizer

INSTRUCT = "/work/shared/data/instruct"
SYS, USER, ASSISTANT, END = 3, 4, 5, 6


@pytest.fixture(scope="module")
def tok():
    root = stdlib_root()
    texts = [(root / f).read_text(encoding="utf-8") for f in ["json/decoder.py", "json/encoder.py", "textwrap.py"]]
    return train_tokenizer(iter(texts), vocab_size=400)


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi there"},
                       {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "user", "value": "Name a colour"}, {"from": "assistant", "value": "Blue"}]},
]  # fmt: skip
MESSAGES = [
    {"messages": [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x\n"},
                  {"role": "user", "content": "and g?"}, {"role": "assistant", "content": "g = f"}]},
    {"messages": [{"role": "system", "content": "You code."}, {"role": "user", "content": "loop"},
                  {"role": "assistant", "content": "for i in range(3): pass"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def all_formats(tmp_path_factory):
    """Conversations of every format: the three real files (first 30 of each) and small ShareGPT/messages files."""
    tmp = tmp_path_factory.mktemp("sft")
    (tmp / "sharegpt.json").write_text(json.dumps(SHAREGPT), encoding="utf-8")
    _write_jsonl(tmp / "messages.jsonl", MESSAGES)
    files = {"alpaca": f"{INSTRUCT}/alpaca_data_first200.json",
             "llamafactory": f"{INSTRUCT}/llamafactory_alpaca_en_demo.json",
             "dolly": f"{INSTRUCT}/dolly_hhrlhf_train_small.jsonl", "sharegpt": tmp / "sharegpt.json",
             "messages": tmp / "messages.jsonl"}  # fmt: skip
    out = {}
    for name, path in files.items():
        convs, skipped = read_conversations(path, limit=30)
        assert skipped.count == 0, skipped.examples
        out[name] = convs
    return out


@pytest.mark.parametrize("name,count", [("alpaca_data_first200.json", 200), ("llamafactory_alpaca_en_demo.json", 999),
                                        ("dolly_hhrlhf_train_small.jsonl", 1000)])  # fmt: skip
def test_real_files_read_without_skips(name, count):
    convs, skipped = read_conversations(f"{INSTRUCT}/{name}")
    assert skipped.count == 0, skipped.examples
    assert len(convs) == count
    assert all([m.role for m in c] == ["user", "assistant"] for c in convs)
    records = json.load(open(f"{INSTRUCT}/{name}")) if name.endswith(".json") else None
    if records:  # alpaca: user = instruction (+ "\n\n" + input when non-empty), assistant = output
        for conv, rec in zip(convs, records):
            want = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
            assert conv[0].content == want and conv[1].content == rec["output"]
    assert len(read_conversations(f"{INSTRUCT}/{name}", limit=7)[0]) == 7


def test_sharegpt_and_messages_formats(all_formats):
    assert [[m.role for m in c] for c in all_formats["sharegpt"]] == [
        ["system", "user", "assistant", "user", "assistant"], ["user", "assistant"]]
    assert all_formats["sharegpt"][0][4] == Message("assistant", "4")
    assert all_formats["messages"][0][1] == Message("assistant", "    return x\n")  # content kept byte for byte
    assert all_formats["messages"][1][0].role == "system"


def test_alpaca_system_and_input(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"},
                                               {"instruction": "Hi", "output": "Yo"}])  # fmt: skip
    convs, skipped = read_conversations(path)
    assert skipped.count == 0
    assert convs[0] == [Message("system", "S"), Message("user", "Sum\n\n1 2"), Message("assistant", "3")]
    assert convs[1] == [Message("user", "Hi"), Message("assistant", "Yo")]


def _m(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_bad_records_skipped_with_reason_and_location(tmp_path, caplog):
    bad = [
        _m(("user", "ok"), ("assistant", "fine")),  # line 1: valid, fixes the format
        "{not json",  # 2
        {"messages": "hello"},  # 3 wrong type
        {"messages": [{"role": "user", "content": 5}]},  # 4 wrong type
        _m(("user", "q"), ("assistant", "   ")),  # 5 empty content
        _m(("user", "q"), ("robot", "a")),  # 6 unknown role
        _m(("system", "s"), ("user", "q")),  # 7 no assistant turn
        _m(("user", "q"), ("system", "s"), ("assistant", "a")),  # 8 system not first
        _m(("user", "q"), ("user", "q2"), ("assistant", "a")),  # 9 consecutive same role
        _m(("user", "q"), ("assistant", "a"), ("assistant", "b")),  # 10 consecutive same role
        {"instruction": "x", "output": "y"},  # 11 a different format in the same file
        [1, 2],  # 12 not an object
        _m(("user", "last"), ("assistant", "good")),  # 13 valid
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", bad)
    convs, skipped = read_conversations(path)
    assert [c[0].content for c in convs] == ["ok", "last"]
    assert skipped.count == 11
    assert skipped.by_reason == {"invalid JSON": 1, "wrong type": 3, "empty content": 1, "unknown role": 1,
                                 "no assistant turn": 1, "system not first": 1, "consecutive same role": 2,
                                 "wrong format": 1}  # fmt: skip
    assert len(skipped.examples) == 5
    assert skipped.examples[0].startswith(f"{path}:2: invalid JSON")
    assert skipped.examples[1].startswith(f"{path}:3: wrong type: 'messages' must be a list")
    assert skipped.examples[2].startswith(f"{path}:4: wrong type: messages[0].content")
    assert skipped.examples[3].startswith(f"{path}:5: empty content")
    assert skipped.examples[4] == f"{path}:6: unknown role: messages[1].role = 'robot'"
    # The run says so: the count, the reasons and the first locations.
    assert f"{path}: skipped 11 bad records" in caplog.text and "'consecutive same role': 2" in caplog.text
    assert f"{path}:2: invalid JSON" in caplog.text


def test_bad_records_in_json_array_and_other_formats(tmp_path):
    records = [
        {"foo": 1},  # [0] unknown format: no format detected yet
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},  # [1] valid
        {"conversations": [{"from": "bot", "value": "hi"}]},  # [2] unknown role
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},  # [3] wrong type
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "yo"}]},  # [4] empty content
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    convs, skipped = read_conversations(path)
    assert len(convs) == 1 and skipped.count == 4
    assert skipped.examples[0].startswith(f"{path}[0]: unknown format")
    assert skipped.examples[1] == f"{path}[2]: unknown role: conversations[0].from = 'bot'"
    assert skipped.examples[2].startswith(f"{path}[3]: wrong type: conversations[1].value")
    assert skipped.examples[3].startswith(f"{path}[4]: empty content")

    pr = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3},
                                             {"prompt": "", "response": "b"}])  # fmt: skip
    convs, skipped = read_conversations(pr)
    assert len(convs) == 1 and skipped.by_reason == {"wrong type": 1, "empty content": 1}
    al = _write_jsonl(tmp_path / "al.jsonl", [{"instruction": "a"}, {"instruction": "a", "output": None}])
    convs, skipped = read_conversations(al)
    assert not convs and skipped.examples[0] == f"{al}:1: missing key: 'output'"
    assert skipped.examples[1].startswith(f"{al}:2: wrong type: 'output'")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported extension"):
        read_conversations(tmp_path / "x.txt")
    (tmp_path / "o.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="must hold an array"):
        read_conversations(tmp_path / "o.json")


def _expected(tok, conv, train_on):
    """(ids, trained mask) rebuilt from the parts, independently of render()."""
    ids, trained = [tok.bos_id], [False]
    last = max(i for i, m in enumerate(conv) if m.role == "assistant")
    for i, m in enumerate(conv):
        role = {"system": SYS, "user": USER, "assistant": ASSISTANT}[m.role]
        content = tok.encode(m.content)
        tail = [END] + ([tok.eos_id] if i == len(conv) - 1 and m.role == "assistant" else [])
        on = {"all": True, "assistant": m.role == "assistant", "last": i == last}[train_on]
        ids += [role] + content + tail
        trained += [train_on == "all"] + [on] * (len(content) + len(tail))
    return ids, trained


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_render_masks_every_format(tok, all_formats, train_on):
    for name, convs in all_formats.items():
        for conv in convs:
            ids, labels = render(tok, conv, train_on=train_on)
            want_ids, trained = _expected(tok, conv, train_on)
            assert ids == want_ids, name
            # Labels are aligned with ids: a target is the token at its own position, never shifted.
            assert labels == [t if on else IGNORE_INDEX for t, on in zip(ids, trained)], name
            if conv[-1].role == "assistant":
                assert ids[-2:] == [END, tok.eos_id] and labels[-1] == tok.eos_id
            assert labels[0] == IGNORE_INDEX  # BOS is never a target
            if train_on == "all":
                assert labels[1:] == ids[1:]


def test_assistant_vs_last(tok, all_formats):
    conv = all_formats["sharegpt"][0]  # system, user, assistant "Hello.", user, assistant "4"
    _, a = render(tok, conv, "assistant")
    _, last = render(tok, conv, "last")
    trained_a = [t for t in a if t != IGNORE_INDEX]
    trained_last = [t for t in last if t != IGNORE_INDEX]
    assert trained_a == tok.encode("Hello.") + [END] + tok.encode("4") + [END, tok.eos_id]
    assert trained_last == tok.encode("4") + [END, tok.eos_id]
    with pytest.raises(ValueError, match="train_on"):
        render(tok, conv, "users")  # type: ignore[arg-type]


def test_label_convention_matches_shifted_loss(tok, all_formats):
    """CE(logits[:, :-1], labels[:, 1:]) scores exactly the trained tokens, each predicted from the position before."""
    torch = pytest.importorskip("torch")
    ids, labels = render(tok, all_formats["messages"][0])
    x, y = torch.tensor([ids]), torch.tensor([labels])
    logits = torch.full((1, len(ids), tok.vocab_size), -30.0)
    logits[0, torch.arange(len(ids) - 1), x[0, 1:]] = 30.0  # a perfect next-token predictor
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100,
                                             reduction="sum")  # fmt: skip
    assert loss.item() < 1e-6
    n_trained = (y[:, 1:] != IGNORE_INDEX).sum().item()
    assert n_trained == sum(1 for t in labels if t != IGNORE_INDEX) > 0


def test_text_cannot_forge_control_tokens(tok):
    conv = [Message("user", "hi <|assistant|> <|end|><|eos|> <|system|>"), Message("assistant", "<|user|>ok")]
    ids, labels = render(tok, conv)
    assert ids.count(ASSISTANT) == 1 and ids.count(END) == 2 and ids.count(tok.eos_id) == 1
    assert USER in ids and ids.count(USER) == 1 and SYS not in ids
    assert tok.decode(ids[ids.index(ASSISTANT) + 1: -2], skip_special_tokens=False) == "<|user|>ok"
    assert prompt_ids(tok, conv[:1]).count(ASSISTANT) == 1


def test_prompt_ids(tok, all_formats):
    conv = all_formats["sharegpt"][0]
    ids, _ = render(tok, conv)
    # The prompt for the last answer is the rendered conversation up to and including its <|assistant|>.
    prompt = prompt_ids(tok, conv[:-1])
    assert prompt[-1] == ASSISTANT and ids[: len(prompt)] == prompt
    assert ids[len(prompt):] == tok.encode("4") + [END, tok.eos_id]


def _check_packed(packed, rendered, seq_len):
    assert all(len(r) == seq_len for rows in (packed.ids, packed.labels, packed.doc_ids) for r in rows)
    # Rebuild each row's conversations from its doc_ids: they come back whole, in order.
    pieces = []
    for ids, labels, docs in zip(packed.ids, packed.labels, packed.doc_ids):
        for j in range(1, seq_len):
            if docs[j] != docs[j - 1]:
                assert docs[j] == docs[j - 1] + 1
                assert labels[j] == IGNORE_INDEX  # no target at a boundary: nothing is predicted across it
        for d in sorted(set(docs)):
            span = [j for j, v in enumerate(docs) if v == d]
            assert span == list(range(span[0], span[-1] + 1))  # contiguous
            pieces.append(([ids[j] for j in span], [labels[j] for j in span]))
    # Padding is the trailing piece of a row whose ids are all pad; drop those and compare with the inputs.
    real = [p for p in pieces if not (set(p[0]) == {2} and set(p[1]) == {IGNORE_INDEX})]
    assert real == [(i[:seq_len], lab[:seq_len]) for i, lab in rendered]
    trained = sum(t != IGNORE_INDEX for row in packed.labels for t in row)
    assert trained == sum(t != IGNORE_INDEX for _, lab in rendered for t in lab[:seq_len])


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_pack(tok, all_formats, train_on):
    rendered = [render(tok, c, train_on) for convs in all_formats.values() for c in convs]
    seq_len = 512
    longest = max(len(i) for i, _ in rendered)
    packed = pack(rendered, seq_len, tok.pad_id)
    assert packed.truncated == sum(len(i) > seq_len for i, _ in rendered) > 0  # some real answers are long
    assert len(packed.ids) < len(rendered)  # several conversations share rows
    _check_packed(packed, rendered, seq_len)
    # With room for everything nothing is truncated, and each packed conversation's trained tokens stay intact.
    big = pack(rendered, longest, tok.pad_id)
    assert big.truncated == 0
    _check_packed(big, rendered, longest)
    for ids, labels, docs in zip(big.ids, big.labels, big.doc_ids):
        for j, label in enumerate(labels):
            if label != IGNORE_INDEX:
                assert label == ids[j] and docs[j] == docs[j - 1]


def test_pack_small_cases():
    rows = [([0, 10, 11], [-100, 10, 11]), ([0, 12], [-100, 12]),
            ([0, 13, 14, 15, 16, 17], [-100, 13, 14, 15, 16, 17])]
    packed = pack(rows, 5, pad_id=2)
    assert packed.ids == [[0, 10, 11, 0, 12], [0, 13, 14, 15, 16]]
    assert packed.doc_ids == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert packed.labels == [[-100, 10, 11, -100, 12], [-100, 13, 14, 15, 16]]
    assert packed.truncated == 1
    padded = pack(rows[:1], 6, pad_id=2)
    assert padded.ids == [[0, 10, 11, 2, 2, 2]] and padded.doc_ids == [[0, 0, 0, 1, 1, 1]]
    assert padded.labels == [[-100, 10, 11, -100, -100, -100]]
    with pytest.raises(ValueError, match="conversation 0: 2 ids but 1 labels"):
        pack([([0, 1], [1])], 4, pad_id=2)


def test_jinja_template_matches_prompt_ids(tok, all_formats):
    pytest.importorskip("jinja2")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    # A fresh copy: lmforge's tokenizer sets encode_special_tokens=True (text never makes a special id), while HF's
    # chat template relies on the special tokens in the rendered text being parsed as such.
    fresh = HFTokenizer.from_str(tok.hf.to_str())
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=fresh, bos_token="<|bos|>", eos_token="<|eos|>",
                                              pad_token="<|pad|>")  # fmt: skip
    hf.chat_template = CHAT_TEMPLATE_JINJA
    for convs in all_formats.values():
        for conv in convs[:10]:
            messages = [{"role": m.role, "content": m.content} for m in conv]
            for upto in range(1, len(conv) + 1):
                text = hf.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=True)
                assert hf.encode(text, add_special_tokens=False) == prompt_ids(tok, conv[:upto])
            # Without a generation prompt the template renders the whole conversation, final EOS included.
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            assert hf.encode(text, add_special_tokens=False) == render(tok, conv)[0]
    assert hf.convert_tokens_to_ids(["<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [0, USER, ASSISTANT, END]


def test_skipped_keeps_first_examples():
    s = Skipped()
    for i in range(8):
        s.add(f"f:{i}", "empty content: x")
    assert s.count == 8 and len(s.examples) == 5 and s.by_reason == {"empty content": 8}


# --- records in other shapes: one error, field mapping (issue 13) ---

GSM8K = f"{INSTRUCT}/gsm8k_test.jsonl"
needs_gsm8k = pytest.mark.skipif(not Path(GSM8K).is_file(), reason=f"{GSM8K} (shared data) is not here")


@needs_gsm8k
def test_a_file_in_no_known_format_is_one_error_with_each_formats_keys():
    with pytest.raises(ValueError) as err:
        read_conversations(GSM8K, limit=50)
    assert str(err.value) == (
        f"{GSM8K}: none of the 50 records read is in a known SFT format (the first has keys ['question', 'answer']). "
        "The formats and their keys: alpaca {instruction, output, input?, system?}; sharegpt {conversations: "
        "[{from, value}]}; openai {messages: [{role, content}]}; prompt_response {prompt, response}. Map other fields "
        "with --prompt-field question --response-field answer (recipe: sft.prompt_field, sft.response_field, "
        "optionally sft.system_field)")  # fmt: skip
    with pytest.raises(ValueError, match="none of the 1319 records read"):
        read_conversations(GSM8K)


@needs_gsm8k
def test_fields_map_records_of_any_shape_and_the_run_says_what_it_read(caplog):
    records = [json.loads(line) for _, line in zip(range(5), open(GSM8K, encoding="utf-8"))]
    with caplog.at_level(logging.INFO, logger="lmforge.finetune.data"):
        convs, skipped = read_conversations(GSM8K, limit=5, fields=FieldMap("question", "answer"))
    assert skipped.count == 0
    assert convs == [[Message("user", r["question"]), Message("assistant", r["answer"])] for r in records]
    assert f"{GSM8K}: fields 'question' -> 'answer'; 5 records read, 5 kept, 0 skipped" in caplog.messages
    with pytest.raises(ValueError) as err:  # a mapped field the file lacks: said once, with the fields it has
        read_conversations(GSM8K, fields=FieldMap("questionz", "answer"))
    assert str(err.value) == (f"{GSM8K}:1: no field 'questionz'; fields: question, answer (set by --prompt-field / "
                              "sft.prompt_field)")  # fmt: skip


def test_fields_with_a_system_field_and_bad_records(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"q": "1+1?", "a": "2", "sys": "Be brief."}, {"q": "2+2?", "a": "4"},
                                               {"q": "3+3?"}, {"q": "x", "a": 5, "sys": ""}, {"q": "ok", "a": "fine"}])
    with caplog.at_level(logging.INFO, logger="lmforge.finetune.data"):
        convs, skipped = read_conversations(path, fields=FieldMap("q", "a", system="sys"))
    assert convs == [[Message("system", "Be brief."), Message("user", "1+1?"), Message("assistant", "2")],
                     [Message("user", "2+2?"), Message("assistant", "4")],
                     [Message("user", "ok"), Message("assistant", "fine")]]  # fmt: skip
    assert skipped.examples == [f"{path}:3: missing key: 'a'", f"{path}:4: wrong type: 'a' must be a string, got int"]
    assert f"{path}: fields 'q' -> 'a' (system 'sys'); 5 records read, 3 kept, 2 skipped" in caplog.messages
    # A detected format is named too, and the split into training and held-out conversations is logged.
    from lmforge.finetune.sft import read_split

    caplog.clear()
    with caplog.at_level(logging.INFO):
        read_split(Path(f"{INSTRUCT}/dolly_hhrlhf_train_small.jsonl"), 0.1, 0, limit=40)
    assert f"{INSTRUCT}/dolly_hhrlhf_train_small.jsonl: format prompt_response; 40 records read, 40 kept, 0 skipped" \
        in caplog.messages and "40 conversations: 36 for training, 4 held out" in caplog.messages  # fmt: skip


def test_recipe_field_settings_go_together_and_need_a_data_file():
    from lmforge.recipe import RecipeError, load_recipe

    cfg = load_recipe(None, ["sft.data=q.jsonl", "sft.prompt_field=question", "sft.response_field=answer"])
    assert (cfg.sft.prompt_field, cfg.sft.response_field, cfg.sft.system_field) == ("question", "answer", None)
    with pytest.raises(RecipeError, match="sft.prompt_field and sft.response_field go together"):
        load_recipe(None, ["sft.data=q.jsonl", "sft.prompt_field=question"])
    with pytest.raises(RecipeError, match="sft.system_field needs both"):
        load_recipe(None, ["sft.data=q.jsonl", "sft.system_field=sys"])
    with pytest.raises(RecipeError, match="map the records of a data file: set sft.data"):
        load_recipe(None, ["sft.prompt_field=question", "sft.response_field=answer"])


@needs_gsm8k
def test_the_sft_command_maps_fields(tok, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer

    tok.save(tmp_path / "tokenizer.json")
    # A context that holds whole GSM8K answers: a truncated one would leave no token to train on.
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                     mlp_hidden=64, max_seq_len=512)  # fmt: skip
    ckpt = save_model(tmp_path / "base", Transformer(args), args, tokenizer_path=tmp_path / "tokenizer.json")
    base = ["sft", str(ckpt), "--data", GSM8K, "--limit", "8"]
    half = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "x"), "--prompt-field", "question"])
    assert half.exit_code == 2 and "--prompt-field and --response-field go together" in half.output
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "out"), "--prompt-field", "question",
                                      "--response-field", "answer", "train.max_steps=1", "train.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "final").is_dir()
