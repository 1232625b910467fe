"""lmforge: the whole language-model lifecycle, from raw text and code to a served model, on a laptop CPU."""

__version__ = "0.1.0"
