"""Evaluation: generation, exact match on task data, perplexity."""
