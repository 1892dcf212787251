"""dzc: a compiler for DeepSeek-V3-family language models."""
__version__ = "0.1.0"
