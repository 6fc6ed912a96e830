"""Model loading: what ``load_model`` sets up on top of transformers."""

from __future__ import annotations

import pytest
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


def test_auto_dtype_is_bf16_only_where_computed_natively():
    import torch

    from rankwise.errors import RankwiseError
    from rankwise.models import resolve_dtype

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_dtype("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(RankwiseError, match="unknown dtype 'int4'"):
        resolve_dtype("int4", torch.device("cpu"))


def test_devices_that_are_not_here_are_refused_in_one_line():
    import torch

    from rankwise.errors import RankwiseError
    from rankwise.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RankwiseError, match="no CUDA GPU"):
            resolve_device("cuda:1")
    with pytest.raises(RankwiseError, match="unknown device 'tpu'"):
        resolve_device("tpu")
