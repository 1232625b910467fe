"""Settings of the sft stage and `lmforge sft` (the `sft` section, docs/finetuning.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.settings import Section
from lmforge.train.config import TrainConfig


class SFTTrainConfig(TrainConfig):
    """The training settings of the sft stage: TrainConfig with defaults for fine-tuning a pre-trained model
    (shorter, a lower AdamW learning rate, short warm-up). A recipe sets only what it changes (`sft.train.lr`)."""

    seq_len: int | None = Field(None, gt=0)  # None: the pre-trained model's max_seq_len
    max_steps: int = Field(200, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(100, gt=0)
    ckpt_every: int = Field(100, gt=0)


class SFTConfig(Section):
    """The sft stage (docs/finetuning.md): supervised fine-tuning of pretrain/final with the chat template."""

    # "docstring_pairs": signature + docstring -> body pairs derived from the curated code (training pairs from
    # curate/train, held-out pairs from curate/val). Otherwise a file of Alpaca, ShareGPT, messages or
    # prompt/response records, of which val_fraction is held out.
    data: str = "docstring_pairs"
    max_pairs: int | None = Field(None, gt=0)  # docstring_pairs: cap on training pairs (the first found)
    heldout_pairs: int = Field(200, gt=0)  # docstring_pairs: cap on held-out pairs (evenly spread)
    # A data file: the share held out. docstring_pairs: the share of training pairs held out when curate/val has
    # no documented function to hold out.
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)  # a data file: read only the first N conversations
    # A data file in no known format: the keys of the user turn, the assistant turn and an optional system message
    # (GSM8K: prompt_field: question, response_field: answer). prompt_field and response_field go together.
    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str | None = None
    method: Literal["full", "lora", "prefix"] = "full"
    train_on: Literal["assistant", "all", "last"] = "assistant"
    freeze_blocks: int = Field(0, ge=0)  # full: freeze the first k blocks
    freeze_embeddings: bool = False  # full: freeze the token (and position) embeddings
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    prefix_length: int = Field(16, gt=0)
    prefix_reparam: bool = False  # learn the prefix through an MLP (Li & Liang), saved as plain key/values
    # Greedy generations on held-out prompts before and after: how many end their turn (EOS) instead of running
    # to the token limit, and how many complete a function that parses (docstring_pairs).
    gen_prompts: int = Field(24, ge=0)
    gen_tokens: int = Field(96, gt=0)
    samples: int = Field(3, ge=0)  # of those, shown in the report
    train: SFTTrainConfig = Field(default_factory=SFTTrainConfig)

    @model_validator(mode="after")
    def _check_fields(self) -> "SFTConfig":
        paired = (self.prompt_field is None) == (self.response_field is None)
        if not paired or (self.system_field and not self.prompt_field):
            raise ValueError("sft.prompt_field and sft.response_field go together (sft.system_field needs both): "
                             f"got prompt_field={self.prompt_field!r}, response_field={self.response_field!r}")
        if self.prompt_field and self.data == "docstring_pairs":
            raise ValueError("sft.prompt_field / sft.response_field map the records of a data file: set sft.data "
                             "to one")
        return self
