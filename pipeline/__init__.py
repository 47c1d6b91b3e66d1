"""Distillery: distill reasoning into language models with one YAML recipe."""

__version__ = "0.1.0"
