"""Tokenizer: byte-level BPE trained with HF `tokenizers`, plus the special tokens every later stage shares.

Design:
- Byte-level: the 256 byte symbols are always in the vocabulary and there is no normalizer, so any Python string
  (emoji, CJK, combining marks, control characters, NUL, CR/LF mixes) round-trips exactly:
  `decode(encode(s)) == s`.
- Pre-tokenization splits every digit on its own (numbers get one consistent spelling instead of whatever merges
  the corpus happened to favour; this costs about 4% compression on Python code), then applies the GPT-2 byte-level
  regex, which keeps a newline with the indentation that follows it so common indents become single tokens.
- `SPECIAL_TOKENS` get ids 0..71 in order: BOS, EOS, PAD and the chat tokens (0..6), then the tokens reserved for
  the denoising objectives: `<|mask|>` (7, MLM) and `<|sentinel_0|>`..`<|sentinel_63|>` (8..71, span corruption).
  The reserved ones are appended after the others, so ids 0..6 keep their meaning. `encode` treats their text as
  ordinary text and never emits a special id: stages that need a BOS or a chat role insert the ids (`bos_id`,
  `token_to_id("<|user|>")`) themselves, so text in the data can never forge a control token.
- 64 sentinels: span corruption at the default density 0.15 and mean span length 3 uses round(0.05 * L) spans of a
  row of L source tokens, and a row of L tokens grows to L + 2 * spans once corrupted; a 1024-token row therefore
  holds about 930 source tokens and 47 spans. 64 covers that with room to spare (rows up to ~1400 tokens) for 64
  embedding rows; settings that would need more make the span batches shorten their source, never fail.

Imported tokenizers (a Hugging Face model's own): `Tokenizer.from_dir` reads any model directory's
`tokenizer.json` with the files beside it that say what its special tokens are (`tokenizer_config.json`,
`special_tokens_map.json`), which ids end a generation (`generation_config.json`) and its chat template
(`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`); `save_dir` writes back exactly what it
read. Such a tokenizer may have no BOS (Qwen) or BOS == EOS (GPT-2), no PAD (PAD falls back to EOS) and never the
reserved `<|mask|>` or sentinels (the objectives that need them refuse it). `encode` never emits a special id from
text for either kind. A document starts with `doc_start_id`: BOS, or EOS for a tokenizer without BOS, which is
the separator GPT-2 and Qwen pre-train with.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.chat_template import ChatTemplate, JinjaChatTemplate, NativeChatTemplate
from lmforge.data.curated import iter_split_texts
from lmforge.io import atomic_write_text
from lmforge.tokenizer_files import TOKENIZER_FILES, TOKENIZER_JSON, Imported, read_imported
from lmforge.settings import Section

log = logging.getLogger(__name__)

class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=260, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    max_train_chars: int = Field(20_000_000, gt=0)  # cap on text fed to BPE training


N_SENTINELS = 64
MASK = "<|mask|>"
SENTINELS = [f"<|sentinel_{i}|>" for i in range(N_SENTINELS)]
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", MASK,
                  *SENTINELS]  # fmt: skip
BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
# The label of a position no loss counts (torch's cross_entropy default): every batch builder and every loss
# uses this one value, next to the token ids it stands apart from.
IGNORE_INDEX = -100
_BPT_SAMPLE_BYTES = 4_000_000  # enough val text for a stable bytes-per-token figure
_ENCODE_CHUNK_DOCS = 256


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer`: lmforge's own (fixed special ids, `imported` None) or a
    Hugging Face model's (`imported` says its special tokens and template). See the module docstring."""

    def __init__(self, hf: HFTokenizer, imported: Imported | None = None) -> None:
        if imported is None:
            _check_native_layout(hf)
        # Not stored in tokenizer.json, so it is set on every construction.
        hf.encode_special_tokens = True
        self.hf = hf
        self.imported = imported
        self._parsing: HFTokenizer | None = None  # a copy that turns special tokens' text into their ids
        self._chat: ChatTemplate | None = None
        if imported is not None:
            self._bos, self._eos, self._pad = (self._named_id(imported, k) for k in ("bos", "eos", "pad"))
            if self._eos is None and not imported.generation_eos:
                raise ValueError(f"{imported.source}: the tokenizer names no EOS token (eos_token in "
                                 "tokenizer_config.json or special_tokens_map.json, eos_token_id in "
                                 "generation_config.json); lmforge needs one to end documents and replies")  # fmt: skip

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """lmforge's tokenizer.json, or any other one together with the files beside it (`from_dir`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist; run the tokenizer stage first")
        hf = HFTokenizer.from_file(str(path))
        if hf.token_to_id(SPECIAL_TOKENS[0]) == 0:  # lmforge's layout (an older lmforge's is refused by __init__)
            return cls(hf)
        return cls(hf, read_imported(path))

    @classmethod
    def from_dir(cls, dir: str | Path) -> Tokenizer:
        """The tokenizer of a model directory: an lmforge checkpoint or export, or a Hugging Face model's."""
        path = Path(dir) / TOKENIZER_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{dir} has no {TOKENIZER_JSON}: lmforge reads fast tokenizers only; write one "
                                    "with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")  # fmt: skip
        return cls.from_file(path)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.hf.to_str(pretty=True))

    def save_dir(self, dir: str | Path) -> None:
        """Write the tokenizer's files into `dir`: tokenizer.json, and for an imported one every file it was read
        from (its special tokens, stop ids and chat template), byte for byte."""
        dir = Path(dir)
        if self.imported is None:
            self.save(dir / TOKENIZER_JSON)
            return
        for name, text in self.imported.files.items():
            atomic_write_text(dir / name, text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added and none parsed from the text."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust side."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str, parse_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each token's character span in it. `parse_special`: a special token's text becomes its
        id, as transformers tokenizes a rendered chat template (only chat templates ask for this)."""
        if not parse_special:
            enc = self.hf.encode(text, add_special_tokens=False)
        else:
            if self._parsing is None:
                self._parsing = HFTokenizer.from_str(self.hf.to_str())
                self._parsing.encode_special_tokens = False
            enc = self._parsing.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """BOS, or None for an imported tokenizer without one (Qwen)."""
        return SPECIAL_TOKENS.index(BOS) if self.imported is None else self._bos

    @property
    def eos_id(self) -> int:
        if self.imported is None:
            return SPECIAL_TOKENS.index(EOS)
        return self._eos if self._eos is not None else self.imported.generation_eos[0]

    @property
    def pad_id(self) -> int:
        """PAD, or EOS for an imported tokenizer without one (padding is never a target, so any id serves)."""
        if self.imported is None:
            return SPECIAL_TOKENS.index(PAD)
        return self._pad if self._pad is not None else self.eos_id

    @property
    def doc_start_id(self) -> int:
        """The token every document starts with: BOS, or EOS where there is no BOS (see the module docstring)."""
        bos = self.bos_id
        return bos if bos is not None else self.eos_id

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a generation: EOS and, for an imported model, generation_config.json's eos ids."""
        if self.imported is None:
            return [self.eos_id]
        return list(dict.fromkeys([self.eos_id, *self.imported.generation_eos]))

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end an assistant reply: the chat template's end-of-turn token, then `eos_ids`."""
        turn = self.chat_template.end_of_turn_ids if self.has_chat_template else []
        return list(dict.fromkeys([*turn, *self.eos_ids]))

    @property
    def mask_id(self) -> int:
        if self.imported is not None:
            raise ValueError(_NO_RESERVED.format(what="<|mask|>", objective="mlm"))
        return SPECIAL_TOKENS.index(MASK)

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of `<|sentinel_0|>`, `<|sentinel_1|>`, ... in order (span corruption uses them in that order)."""
        if self.imported is not None:
            raise ValueError(_NO_RESERVED.format(what="<|sentinel_N|>", objective="span"))
        first = SPECIAL_TOKENS.index(SENTINELS[0])
        return list(range(first, first + N_SENTINELS))

    @property
    def special_ids(self) -> list[int]:
        """Every special token's id, never produced by `encode`: lmforge's 0..len(SPECIAL_TOKENS)-1, or every
        added token an imported tokenizer marks special."""
        if self.imported is None:
            return list(range(len(SPECIAL_TOKENS)))
        return sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    @property
    def has_chat_template(self) -> bool:
        return self.imported is None or self.imported.chat_template is not None

    @property
    def chat_template(self) -> ChatTemplate:
        """lmforge's own template, or the imported model's Jinja one; ValueError when the model has none."""
        if self._chat is None:
            if self.imported is None:
                self._chat = NativeChatTemplate(self)
            elif self.imported.chat_template is None:
                raise ValueError(f"{self.imported.source} has no chat template ({self.imported.no_template_reason}), "
                                 "so it cannot chat or be fine-tuned on conversations; plain-text generation "
                                 "works, or use a chat model's tokenizer")  # fmt: skip
            else:
                self._chat = JinjaChatTemplate(self, self.imported.chat_template, self._template_variables(),
                                               origin=str(self.imported.source))  # fmt: skip
        return self._chat

    def _template_variables(self) -> dict[str, str]:
        """The special tokens' text a Jinja template sees (transformers passes the same names)."""
        assert self.imported is not None
        named = {"bos_token": self.imported.bos, "eos_token": self.imported.eos, "pad_token": self.imported.pad,
                 "unk_token": self.imported.unk}  # fmt: skip
        return {k: v for k, v in named.items() if v is not None}

    def _named_id(self, imported: Imported, kind: str) -> int | None:
        token = getattr(imported, kind)
        if token is None:
            return None
        found = self.hf.token_to_id(token)
        if found is None:
            raise ValueError(f"{imported.source}: {kind}_token {token!r} is not in its {TOKENIZER_JSON}")
        return found


_NO_RESERVED = ("objective '{objective}' needs lmforge's reserved {what} token; an imported tokenizer has none: "
                "use objective causal")  # fmt: skip


def _check_native_layout(hf: HFTokenizer) -> None:
    for i, token in enumerate(SPECIAL_TOKENS):
        found = hf.token_to_id(token)
        if found is None and i > 0 and hf.token_to_id(SPECIAL_TOKENS[0]) == 0:
            raise ValueError(f"tokenizer lacks the reserved token {token!r} (id {i}): it was trained by an "
                             "older lmforge; retrain it with the tokenizer stage")  # fmt: skip
        if found != i:
            raise ValueError(f"tokenizer must map {token!r} to id {i}, found {found}")


def _new_hf_tokenizer() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` (consumed once, streamed).

    The vocabulary is never smaller than the 256 byte symbols plus the special tokens, whatever `vocab_size` says.
    """
    hf = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


class _CappedTexts:
    """Yields texts until `max_chars` characters have been given (the last one cut to fit), counting them."""

    def __init__(self, texts: Iterable[str], max_chars: int) -> None:
        self.texts = texts
        self.max_chars = max_chars
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            remaining = self.max_chars - self.chars
            if remaining <= 0:
                return
            text = text[:remaining]
            self.chars += len(text)
            yield text


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], max_bytes: int = _BPT_SAMPLE_BYTES) -> float:
    """UTF-8 bytes per token over `texts`, reading whole texts until at least `max_bytes` have been measured."""
    n_bytes = n_tokens = 0
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(chunk) == _ENCODE_CHUNK_DOCS or n_bytes >= max_bytes:
            n_tokens += sum(map(len, tok.encode_batch(chunk)))
            chunk = []
        if n_bytes >= max_bytes:
            break
    n_tokens += sum(map(len, tok.encode_batch(chunk)))
    return n_bytes / n_tokens if n_tokens else 0.0


def run_tokenizer(curate_dir: Path, cfg: TokenizerConfig, out_dir: Path) -> dict[str, Any]:
    """Train on the curated `train` split (at most `cfg.max_train_chars` characters), save `out_dir/tokenizer.json`.

    Returns metrics: vocab_size, train_chars, bytes_per_token (on the val split, or train when val is empty),
    train_seconds and seconds (the whole stage).
    """
    start = time.perf_counter()
    curate_dir, out_dir = Path(curate_dir), Path(out_dir)
    if not (curate_dir / "train").is_dir():
        raise FileNotFoundError(f"{curate_dir / 'train'} does not exist; run the curate stage first")
    texts = _CappedTexts(iter_split_texts(curate_dir, "train"), cfg.max_train_chars)
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    train_seconds = time.perf_counter() - start
    if texts.chars == 0:
        raise ValueError(f"{curate_dir / 'train'} holds no text to train a tokenizer on")
    tok.save(out_dir / "tokenizer.json")
    has_val = (curate_dir / "val").is_dir() and next(iter_split_texts(curate_dir, "val"), None) is not None
    bpt = bytes_per_token(tok, iter_split_texts(curate_dir, "val" if has_val else "train"))
    metrics = {
        "vocab_size": tok.vocab_size,
        "train_chars": texts.chars,
        "bytes_per_token": round(bpt, 4),
        "bytes_per_token_split": "val" if has_val else "train",  # train when there is no val split
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    log.info(
        "tokenizer: %d tokens trained on %d characters in %.1fs; %.3f bytes per token on the %s split",
        metrics["vocab_size"], metrics["train_chars"], metrics["train_seconds"], metrics["bytes_per_token"],
        metrics["bytes_per_token_split"],
    )  # fmt: skip
    return metrics

