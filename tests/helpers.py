"""Data the training tests share."""

import argparse
from pathlib import Path

import numpy as np


class ByteSplit:
    """Real text as tokens: the bytes of a standard-library source file (vocab 256)."""

    def __init__(self) -> None:
        self.tokens = np.frombuffer(Path(argparse.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
        self.n_tokens = len(self.tokens)

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]
