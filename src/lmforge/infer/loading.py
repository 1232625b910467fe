"""What generate and chat run: any model directory, in lmforge's one backbone.

An lmforge checkpoint, the folder `lmforge export` wrote from one, or any Hugging Face model of a supported family
(Llama, Mistral, Qwen2, Qwen3, GPT-2; lmforge.model.hf_import) loads into `Transformer`, with the directory's own
tokenizer, special tokens, stop ids and chat template (lmforge.tokenizer). A hub id is read from the local cache.

The weights keep their stored dtype, except on the CPU, where a bf16 or fp16 model is widened to fp32 unless the
caller asks otherwise: CPU matmuls in bf16 run about a hundred times slower than in fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lmforge.device import resolve_device
from lmforge.model.io import load_checkpoint_tokenizer, load_model, require_checkpoint
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def inference_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype to load weights in for inference: `dtype` when given, fp32 on the CPU, else the stored one."""
    if dtype is not None:
        return dtype
    return torch.float32 if device.type == "cpu" else None


def load_for_generation(path: Path | str, device: str = "auto",
                        dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer]:  # fmt: skip
    """The model (on `device`: auto, cpu, cuda or cuda:N, in eval mode) and tokenizer of a model directory."""
    path = require_checkpoint(path)
    dev = resolve_device(device)
    model, _ = load_model(path, device=dev, dtype=inference_dtype(dev, dtype))
    return model.eval(), load_checkpoint_tokenizer(path)
