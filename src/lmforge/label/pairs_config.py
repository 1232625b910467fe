"""Settings of the pairs stage and `lmforge pairs` (the `pairs` section, docs/labelling.md "Pairs to label")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.settings import Section


class PairsConfig(Section):
    """The pairs stage: replies of the run's model (and any other checkpoints) to prompts, for people or a judge to
    compare."""

    # "docstring_pairs": the sft stage's signature + docstring prompts from the run's curated code (its training
    # split); otherwise a prompts file (lmforge.align.prompts: MBPP, GSM8K, messages or prompt records).
    prompts: str = "docstring_pairs"
    format: Literal["mbpp", "gsm8k", "messages", "prompt"] | None = None  # a prompts file's, else detected
    limit: int = Field(64, gt=0)  # prompts used (the first N)
    # Other models to compare with the run's: name -> checkpoint directory. Without any, the run's model replies
    # `samples` times to each prompt (with different seeds), as RLAIF compares samples of one policy.
    checkpoints: dict[str, str] = Field(default_factory=dict)
    samples: int = Field(2, ge=2)  # replies of the run's model per prompt when no other checkpoint is given
    max_new_tokens: int = Field(96, gt=0)
    temperature: float = Field(0.8, gt=0.0)  # sampling: two greedy replies of one model would be the same
    seed: int = 0
    device: str = "auto"
