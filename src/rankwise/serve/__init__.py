"""Serving many adapters on one base model: the batched engine and the HTTP server."""
