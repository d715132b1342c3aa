"""memcirc: find, explain and remove verbatim memorization in causal language models."""

__version__ = "0.1.0"
