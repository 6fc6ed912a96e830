"""Model loading: what ``load_model`` sets up on top of transformers."""

from __future__ import annotations

import torch
from conftest import save_tiny_model

from rankwise.models import load_model


def test_loaded_head_gets_contiguous_input_and_same_logits(tmp_path):
    """The head's pre-hook hands it a contiguous block (a strided one makes torch copy W)."""
    loaded = load_model(str(save_tiny_model(tmp_path / "tiny")))
    seen = []
    head = loaded.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (3, 6))
    with torch.no_grad():
        last = loaded.model(ids, logits_to_keep=1).logits  # the head reads a strided view
        every = loaded.model(ids).logits
    assert seen == [True, True]
    assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(last, every[:, -1:])
