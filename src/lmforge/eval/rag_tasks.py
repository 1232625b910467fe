"""Retrieval-augmented generation tasks: SQuAD 2.0 retrieval and answers, RGB's robustness checks.

- `squad_retrieval`: the paragraphs of a SQuAD 2.0 file are indexed (lmforge.rag's in-memory index, one document
  per paragraph); each answerable question searches them, and recall@1/5/10 and MRR@10 of its own paragraph are
  reported for bm25, and for dense and hybrid when `eval.rag_embedder` names an embedding checkpoint.
- `squad_answer`: the model answers each question from its top `eval.rag_k` paragraphs, unless lmforge.rag's
  refusal rule (the question's coverage by them below `eval.rag_threshold`) answers "not in the documents"
  first, as `lmforge rag ask` would: exact match and F1 (SQuAD's normalisation, the best over the gold answers)
  on the answerable questions, the share of answers saying the documents do not hold it on the unanswerable ones,
  and how often each kind was refused.
- `rgb_counterfactual`: RGB's counterfactual passages (`positive_wrong`, which state the `fakeanswer`): the
  shares of answers repeating the fake answer, giving the true one, and flagging the conflict.
- `rgb_noise`: a positive passage among k irrelevant ones (`negative`), accuracy for each k of `eval.rag_noise`,
  on the records with at least max(k) negatives, so that every k scores the same questions.
- `rgb_negative`: only irrelevant passages: the share of answers saying the information is missing.

Every rate comes with its Wilson interval (F1 and MRR as fractional successes, as pass@k is). Answers are greedy,
from the prompt of `rag_prompt` (the documents first, the question last, so a prompt cut to fit the context keeps
the question); `truncated` counts the prompts that were cut.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.eval.config import EvalConfig
from lmforge.eval.scorer import LanguageModel, generate_until
from lmforge.eval.tasks import RAG_TASKS, Skipped, TaskError, load_records, normalize_answer
from lmforge.stats import proportion

RETRIEVAL_KS = (1, 5, 10)
_SAMPLES = 3  # answers kept in the result for a reader to look at

# An answer saying the documents lack the information (the prompt asks for "The documents do not contain the
# answer."; a model may word it otherwise).
_MISSING = re.compile(
    r"\b(?:(?:does|do|did)\s*n[o']t\s+(?:contain|say|mention|include|state|know)|not\s+(?:contain|mentioned|stated|"
    r"given|found|provided|included|in\s+the\s+documents)|no\s+(?:answer|information|mention)|can\s*(?:not|'t)\s+"
    r"(?:answer|be\s+answered|find|tell)|insufficient|unanswerable|not\s+enough\s+information)\b",
    re.IGNORECASE,
)
# An answer pointing out that the documents are wrong or disagree.
_CONFLICT = re.compile(r"\b(?:conflict\w*|contradict\w*|inconsisten\w*|factual(?:ly)?\s+(?:errors?|wrong)|"
                       r"incorrect|disagree\w*|wrong)\b", re.IGNORECASE)  # fmt: skip


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    answers: tuple[str, ...]  # empty for an unanswerable question
    paragraph: str  # the id of the paragraph it was asked about


@dataclass
class Squad:
    paragraphs: list[tuple[str, str]]  # (id "title#i", text)
    answerable: list[SquadQuestion]
    unanswerable: list[SquadQuestion]
    skipped: Skipped


def _question(qa: Any, paragraph: str) -> SquadQuestion:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        raise ValueError("needs a non-empty string 'question'")
    answers = qa.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("text"), str)
                                                for a in answers):
        raise ValueError("'answers' must be a list of {'text': ...} objects")
    texts = tuple(dict.fromkeys(a["text"] for a in answers if a["text"].strip()))
    if bool(qa.get("is_impossible", not texts)) == bool(texts):
        raise ValueError(f"'is_impossible' is {qa.get('is_impossible')!r} but {len(texts)} answer(s) are given")
    return SquadQuestion(str(qa.get("id", "")), qa["question"].strip(), texts, paragraph)


def load_squad(path: Path) -> Squad:
    """The paragraphs and questions of a SQuAD 2.0 file ({"data": [{"title", "paragraphs": [{"context", "qas"}]}]});
    a malformed paragraph or question is skipped and counted with its place in the file."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"SQuAD file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8")).get("data")
    except (json.JSONDecodeError, AttributeError) as e:
        raise TaskError(f"{path} is not a SQuAD JSON object with a 'data' list ({e})") from e
    if not isinstance(data, list):
        raise TaskError(f"{path}: 'data' must be a list of articles, got {type(data).__name__}")
    squad = Squad([], [], [], Skipped())
    for i, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        for j, par in enumerate(paragraphs if isinstance(paragraphs, list) else []):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            if not (isinstance(par, dict) and isinstance(par.get("context"), str) and isinstance(par.get("qas"), list)):
                squad.skipped.add(where, "needs a string 'context' and a 'qas' list")
                continue
            pid = f"{article.get('title', i)}#{j}"
            squad.paragraphs.append((pid, par["context"]))
            for k, qa in enumerate(par["qas"]):
                try:
                    q = _question(qa, pid)
                except ValueError as e:
                    squad.skipped.add(f"{where}.qas[{k}]", str(e))
                    continue
                (squad.answerable if q.answers else squad.unanswerable).append(q)
    if not squad.paragraphs:
        raise TaskError(f"{path} has no valid SQuAD paragraph "
                        f"({squad.skipped.count} skipped: {squad.skipped.examples})")
    return squad


@dataclass(frozen=True)
class RGBRecord:
    id: str
    query: str
    answer: tuple[tuple[str, ...], ...]  # every part must be given; each part is one of its alternatives
    fakeanswer: str
    positive: tuple[str, ...]
    positive_wrong: tuple[str, ...]
    negative: tuple[str, ...]


def _answer_parts(value: Any) -> tuple[tuple[str, ...], ...]:
    """RGB's answer: a string, or a list whose items (a string or a list of alternatives) must all be given."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"'answer' must be a string or a non-empty list, got {value!r}")
    parts = tuple((item,) if isinstance(item, str) else tuple(item) if isinstance(item, list) else () for item in items)
    if not all(part and all(isinstance(a, str) and a.strip() for a in part) for part in parts):
        raise ValueError(f"'answer' items must be non-empty strings or lists of them, got {value!r}")
    return parts


def _passages(rec: dict, key: str) -> tuple[str, ...]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"'{key}' must be a list of strings")
    return tuple(value)


def rgb_record(rec: dict) -> RGBRecord:
    """One RGB record; raises ValueError naming the bad key."""
    query, fake = rec.get("query"), rec.get("fakeanswer")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("needs a non-empty string 'query'")
    if not isinstance(fake, str) or not fake.strip():
        raise ValueError("needs a non-empty string 'fakeanswer'")
    positive, wrong, negative = (_passages(rec, key) for key in ("positive", "positive_wrong", "negative"))
    return RGBRecord(str(rec.get("id", "")), query.strip(), _answer_parts(rec.get("answer")), fake, positive, wrong,
                     negative)  # fmt: skip


def load_rgb(path: Path, limit: int | None = None) -> tuple[list[RGBRecord], Skipped]:
    """RGB's JSON Lines records (id, query, answer, fakeanswer, positive, positive_wrong, negative)."""
    return load_records(path, rgb_record, "RGB", limit)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD's rule: an empty side scores 1 only against another empty side
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD's token F1 of the normalised texts, the best over the gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def rank_of(gold: str, ranked: Sequence[str]) -> int | None:
    """The 1-based rank of `gold` among `ranked` document ids, None when it is absent."""
    return next((i for i, doc in enumerate(ranked, 1) if doc == gold), None)


def retrieval_metrics(ranks: Sequence[int | None], ks: Sequence[int] = RETRIEVAL_KS,
                      label: str = "") -> dict[str, dict[str, Any]]:  # fmt: skip
    """recall@k (gold within the first k) and MRR@max(k) (1/rank, 0 beyond max(k)) of the gold documents' ranks."""
    n, top = len(ranks), max(ks)
    out = {f"{label}recall@{k}": proportion(sum(r is not None and r <= k for r in ranks), n) for k in ks}
    out[f"{label}mrr@{top}"] = proportion(sum(1 / r for r in ranks if r is not None and r <= top), n)
    return out


def contains_answer(text: str, answer: Sequence[Sequence[str]]) -> bool:
    """Every part of `answer` has an alternative whose normalised words appear, in order, in the normalised text."""
    padded = f" {normalize_answer(text)} "
    return all(any(f" {normalize_answer(alt)} " in padded for alt in part if normalize_answer(alt)) for part in answer)


def says_missing(text: str) -> bool:
    """The answer says the documents do not hold the information."""
    return bool(_MISSING.search(text))


def flags_conflict(text: str) -> bool:
    """The answer says the documents are wrong or contradict each other."""
    return bool(_CONFLICT.search(text))


def rag_prompt(question: str, passages: Sequence[str]) -> str:
    """The documents, numbered, then the instructions and the question: cut from the start to fit a small
    context, the prompt loses documents before it loses the question."""
    docs = "\n\n".join(f"[{i}] {' '.join(p.split())}" for i, p in enumerate(passages, 1))
    return (f"Documents:\n{docs}\n\nAnswer the question from the documents above, in a few words. If they do not "
            "contain the answer, reply: The documents do not contain the answer. If they contradict each other or "
            "known facts, say that they conflict and give the correct answer."
            f"\nQuestion: {question}\nAnswer:")  # fmt: skip


def generate_answers(lm: LanguageModel, prompts: list[str], cfg: EvalConfig, label: str) -> tuple[list[str], int]:
    """Greedy answers to `prompts` (chat messages with `eval.chat_template`) and how many prompts were cut to fit
    the context beside the answer's tokens."""
    from lmforge.infer.engine import cap_new_tokens

    max_new = cap_new_tokens(cfg.rag_max_new_tokens, lm.max_len, setting="eval.rag_max_new_tokens")
    encode = lm.chat_prompt if cfg.chat_template and lm.chat_prompt else lambda p: lm.prefix + lm.encode(p)
    truncated = sum(len(encode(p)) > lm.max_len - max_new for p in prompts)
    outs = generate_until(lm, prompts, until=("\nQuestion:", "\n\n"), max_new_tokens=max_new,
                          batch_size=cfg.batch_size, label=label, chat=cfg.chat_template)  # fmt: skip
    return [o.strip() for o in outs], truncated


def _samples(questions: Sequence[str], answers: Sequence[str], golds: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"question": q, "answer": a, "gold": g} for q, a, g in list(zip(questions, answers, golds))[:_SAMPLES]]


def _gold_text(answer: Sequence[Sequence[str]]) -> str:
    return " + ".join(part[0] for part in answer)


def rgb_counterfactual(lm: LanguageModel, records: list[RGBRecord], cfg: EvalConfig) -> dict[str, Any]:
    """Answers from the counterfactual passages: how often they repeat the fake answer (without the true one),
    give the true answer, or flag the conflict. The three are counted separately (an answer may both flag the
    conflict and give the true answer, which is RGB's correction)."""
    prompts = [rag_prompt(r.query, r.positive_wrong[: cfg.rag_k]) for r in records]
    answers, truncated = generate_answers(lm, prompts, cfg, "rgb_counterfactual")
    true = [contains_answer(a, r.answer) for a, r in zip(answers, records)]
    fake = [contains_answer(a, [[r.fakeanswer]]) and not t for a, r, t in zip(answers, records, true)]
    flagged = [flags_conflict(a) for a in answers]
    n = len(records)
    return {"metrics": {"fake_rate": proportion(sum(fake), n), "true_rate": proportion(sum(true), n),
                        "flag_rate": proportion(sum(flagged), n)},
            "n": n, "truncated": truncated,
            "samples": _samples([r.query for r in records], answers,
                                [_gold_text(r.answer) for r in records])}  # fmt: skip


def noise_passages(record: RGBRecord, k: int) -> list[str]:
    """The record's first positive passage among its first k negatives, in an order fixed by the record and k."""
    passages = [record.positive[0], *record.negative[:k]]
    random.Random(f"{record.id}:{k}").shuffle(passages)
    return passages


def rgb_noise(lm: LanguageModel, records: list[RGBRecord], cfg: EvalConfig) -> dict[str, Any]:
    """Accuracy (the true answer given) with one positive passage and k negatives, for each k of `eval.rag_noise`,
    on the records that have a positive and at least max(k) negatives."""
    most = max(cfg.rag_noise)
    usable = [r for r in records if r.positive and len(r.negative) >= most]
    if not usable:
        raise TaskError(f"rgb_noise: no record has a positive passage and {most} negatives; lower eval.rag_noise")
    metrics, truncated, samples = {}, {}, []
    for k in cfg.rag_noise:
        answers, truncated[k] = generate_answers(lm, [rag_prompt(r.query, noise_passages(r, k)) for r in usable], cfg,
                                                 f"rgb_noise k={k}")  # fmt: skip
        metrics[f"acc@noise{k}"] = proportion(sum(contains_answer(a, r.answer) for a, r in zip(answers, usable)),
                                              len(usable))  # fmt: skip
        samples += _samples([f"(k={k}) {r.query}" for r in usable], answers, [_gold_text(r.answer) for r in usable])[:1]
    return {"metrics": metrics, "n": len(usable), "excluded": len(records) - len(usable),
            "truncated": {str(k): v for k, v in truncated.items()}, "samples": samples}  # fmt: skip


def rgb_negative(lm: LanguageModel, records: list[RGBRecord], cfg: EvalConfig) -> dict[str, Any]:
    """Only irrelevant passages: the share of answers saying the information is missing."""
    usable = [r for r in records if r.negative]
    if not usable:
        raise TaskError("rgb_negative: no record has a negative passage")
    answers, truncated = generate_answers(lm, [rag_prompt(r.query, r.negative[: cfg.rag_k]) for r in usable], cfg,
                                          "rgb_negative")  # fmt: skip
    return {"metrics": {"rejection_rate": proportion(sum(map(says_missing, answers)), len(usable))},
            "n": len(usable), "excluded": len(records) - len(usable), "truncated": truncated,
            "samples": _samples([r.query for r in usable], answers, ["(missing)"] * len(usable))}  # fmt: skip


def retrieval_modes(cfg: EvalConfig) -> list[str]:
    """bm25 always; dense and hybrid need an embedding model."""
    return ["bm25", "dense", "hybrid"] if cfg.rag_embedder else ["bm25"]


def squad_index(squad: Squad, cfg: EvalConfig) -> Any:
    """The paragraphs in lmforge.rag's in-memory index (embedded when `eval.rag_embedder` is set)."""
    from lmforge.rag import build_memory_index

    return build_memory_index(squad.paragraphs, embedder=cfg.rag_embedder)


def paragraph_hits(index: Any, query: str, k: int, mode: str) -> list[Any]:
    """The best hit of each of the first k distinct paragraphs the index returns for `query` (a paragraph longer
    than one chunk would otherwise fill several places)."""
    best: dict[str, Any] = {}
    for hit in index.search(query, k=3 * k, mode=mode):
        best.setdefault(hit.chunk.file, hit)
    return list(best.values())[:k]


def squad_retrieval(squad: Squad, cfg: EvalConfig, index: Any = None) -> dict[str, Any]:
    """recall@1/5/10 and MRR@10 of each answerable question's paragraph (the first `eval.limit` questions), per
    retrieval mode."""
    index = index if index is not None else squad_index(squad, cfg)
    questions = squad.answerable[: cfg.limit]
    metrics: dict[str, dict[str, Any]] = {}
    for mode in retrieval_modes(cfg):
        ranked = ([h.chunk.file for h in paragraph_hits(index, q.question, max(RETRIEVAL_KS), mode)] for q in questions)
        ranks = [rank_of(q.paragraph, ids) for q, ids in zip(questions, ranked)]
        metrics.update(retrieval_metrics(ranks, label=f"{mode} "))
    return {"metrics": metrics, "n": len(questions), "paragraphs": len(squad.paragraphs)}


def squad_answer(lm: LanguageModel, squad: Squad, cfg: EvalConfig, index: Any = None) -> dict[str, Any]:
    """Answers to the first `eval.limit` questions of each kind from their top `eval.rag_k` paragraphs (hybrid
    retrieval with an embedder, else bm25), refused as lmforge.rag.answer refuses (the question's coverage by the
    retrieved paragraphs below `eval.rag_threshold`: the model is not run). Exact match and F1 on the answerable
    questions, the share of "not in the documents" answers on the unanswerable ones, and the refusal rates."""
    from lmforge.rag.answer import NOT_FOUND, THRESHOLD, coverage

    index = index if index is not None else squad_index(squad, cfg)
    mode = retrieval_modes(cfg)[-1]
    threshold = THRESHOLD if cfg.rag_threshold is None else cfg.rag_threshold
    text = dict(squad.paragraphs)
    answerable, unanswerable = squad.answerable[: cfg.limit], squad.unanswerable[: cfg.limit]
    questions = answerable + unanswerable
    hits = [paragraph_hits(index, q.question, cfg.rag_k, mode) for q in questions]
    refused = [coverage(q.question, h) < threshold for q, h in zip(questions, hits)]
    asked = [i for i, r in enumerate(refused) if not r]
    prompts = [rag_prompt(questions[i].question, [text[h.chunk.file] for h in hits[i]]) for i in asked]
    generated, truncated = generate_answers(lm, prompts, cfg, "squad_answer") if prompts else ([], 0)
    answers = [NOT_FOUND] * len(questions)
    for i, generated_answer in zip(asked, generated):
        answers[i] = generated_answer
    n, m = len(answerable), len(unanswerable)
    found = sum(q.paragraph in {h.chunk.file for h in h_} for q, h_ in zip(answerable, hits))
    metrics = {"exact_match": proportion(sum(exact_match(a, q.answers) for q, a in zip(answerable, answers)), n),
               "f1": proportion(sum(f1_score(a, q.answers) for q, a in zip(answerable, answers)), n),
               "no_answer_acc": proportion(sum(map(says_missing, answers[n:])), m),
               f"{mode} recall@{cfg.rag_k}": proportion(found, n),
               "refused answerable": proportion(sum(refused[:n]), n),
               "refused unanswerable": proportion(sum(refused[n:]), m)}  # fmt: skip
    return {"metrics": metrics, "n": n + m, "answerable": n, "unanswerable": m, "retrieval": mode,
            "threshold": threshold, "truncated": truncated,
            "samples": _samples([q.question for q in questions], answers, [list(q.answers) for q in questions])}


def run_rag_task(lm: LanguageModel, name: str, path: Path,
                 cfg: EvalConfig) -> tuple[dict[str, Any], list[list[str]], Skipped]:  # fmt: skip
    """One RAG task's result, the texts the contamination check looks for, and the skipped records."""
    if name in ("squad_retrieval", "squad_answer"):
        squad = load_squad(path)
        if not squad.answerable:
            raise TaskError(f"{path} has no answerable question")
        if name == "squad_retrieval":
            result, questions = squad_retrieval(squad, cfg), squad.answerable[: cfg.limit]
        else:
            result = squad_answer(lm, squad, cfg)
            questions = squad.answerable[: cfg.limit] + squad.unanswerable[: cfg.limit]
        return result, [[q.question, *q.answers] for q in questions], squad.skipped
    score = {"rgb_counterfactual": rgb_counterfactual, "rgb_noise": rgb_noise, "rgb_negative": rgb_negative}.get(name)
    if score is None:
        raise TaskError(f"unknown RAG task {name!r}; choose one of {list(RAG_TASKS)}")
    records, skipped = load_rgb(path, cfg.limit)
    return score(lm, records, cfg), [[r.query, *(p for part in r.answer for p in part[:1])] for r in records], skipped
