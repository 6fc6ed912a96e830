"""EVA (arXiv 2410.07170): components equal the exact PCA of each layer's inputs, ranks are
redistributed as PEFT does, and an EVA-started adapter is an ordinary PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from architectures import save_tiny_model, tiny_model

from rankwise.adapters import expert_layers, read_adapter
from rankwise.adapters.eva import distribute_ranks
from rankwise.adapters.inject import adaptable_modules, module_kinds, select_targets
from rankwise.architectures import dense_weight, shared_input
from rankwise.train import TrainConfig, train
from rankwise.train.calibrated import eva_start

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))


def our_start(model: torch.nn.Module, **settings):
    config = TrainConfig.from_mapping({"r": 4, "lora_alpha": 8, "init": "eva", **settings})
    names = select_targets(model, config.target_modules)
    return eva_start(model, IDS, {n: shared_input(model.config, n) for n in names}, config)


def principal_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine of the principal angles between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb).min().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_components_are_the_exact_pca_of_each_layers_inputs(arch):
    model = tiny_model(arch)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, n=name: inputs.setdefault(n, []).append(args[0].flatten(0, -2))
        )
        for name, module in adaptable_modules(model).items()
    ]
    with torch.no_grad():
        for chunk in IDS.split(4):
            model(input_ids=chunk)
    for handle in handles:
        handle.remove()
    lora, factors = our_start(model)
    for name, (a, b) in factors.items():
        x = torch.cat(inputs[name]).double()
        vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2]
        assert principal_cosine(a, vh[: a.shape[0]]) > 1 - 1e-6, name
        assert not b.any()
        assert lora.expert_for(name).rank == a.shape[0]
        assert lora.expert_for(name).scaling == pytest.approx(8 / 4)  # alpha moved with the rank


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ranks_and_subspaces_agree_with_peft(arch):
    """PEFT runs an incremental, randomized PCA that approximates the exact one used here: the
    rank budget lands on the same layers (within one component where two ratios nearly tie)
    and the subspaces agree to a principal cosine of 0.95."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    model = tiny_model(arch)
    config = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=module_kinds(adaptable_modules(model)),
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99),
    )
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in IDS.split(4)]
    theirs = get_eva_state_dict(model, batches, peft_config=config, show_progress_bar=False)
    _, ours = our_start(model)
    ranks = {n: ours[n][0].shape[0] if n in ours else 0 for n in adaptable_modules(model)}
    their_ranks = {n: theirs[n].shape[0] if n in theirs else 0 for n in ranks}
    assert sum(ranks.values()) == sum(their_ranks.values()) == 4 * len(ranks)
    assert all(abs(ranks[n] - their_ranks[n]) <= 1 for n in ranks)
    if arch == "llama":
        assert ranks == their_ranks
    for name, rank in ranks.items():
        if rank and rank == their_ranks[name]:
            assert principal_cosine(ours[name][0], theirs[name]) > 0.95, name


def test_rank_budget_goes_to_the_largest_ratios_within_each_cap():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.35, 0.2, 0.1])}
    assert distribute_ranks(ratios, {"a": 2, "b": 2}, rho=1.0) == {"a": 2, "b": 2}
    assert distribute_ranks(ratios, {"a": 2, "b": 2}, rho=2.0) == {"a": 2, "b": 2}
    assert distribute_ranks(ratios, {"a": 1, "b": 3}, rho=2.0) == {"a": 2, "b": 2}
    skewed = {"a": torch.tensor([0.9, 0.05, 0.01]), "b": torch.tensor([0.3, 0.2, 0.1])}
    assert distribute_ranks(skewed, {"a": 1, "b": 1}, rho=1.0) == {"a": 1, "b": 1}  # capped
    assert distribute_ranks(skewed, {"a": 1, "b": 1}, rho=2.0) == {"a": 1, "b": 1}
    assert distribute_ranks(skewed, {"a": 2, "b": 2}, rho=1.5) == {"a": 1, "b": 3}


def test_an_eva_adapter_is_a_plain_peft_adapter_on_the_untouched_base(tmp_path):
    """B starts at zero, so the base keeps its weights and the adapter needs no conversion; its
    per-layer ranks travel as PEFT's rank_pattern and alpha_pattern."""
    from peft import PeftModel

    from rankwise.models import load_model

    folder = save_tiny_model("qwen2", tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "abc {i} def {i * 7} ghi"}}\n' for i in range(60)))
    settings = dict(r=4, lora_alpha=8, max_steps=2, batch_size=4, seq_len=16, calib_samples=8)
    config = TrainConfig.from_mapping(
        dict(
            model=str(folder),
            data=str(data),
            output_dir=str(tmp_path / "run"),
            init="eva",
            eval_every=0,
            save_every=0,
            lr=1e-2,
            **settings,
        )
    )
    model = train(config).model.eval()
    fresh = adaptable_modules(tiny_model("qwen2"))
    for name, layer in expert_layers(model).items():
        assert layer.initial_A.numel() == 0
        torch.testing.assert_close(dense_weight(layer.base), dense_weight(fresh[name]))
    weights = read_adapter(tmp_path / "run")
    assert {a.shape[0] for a, _ in weights.factors.values()} != {4}  # the ranks moved
    theirs = PeftModel.from_pretrained(load_model(str(folder)).model, tmp_path / "run").eval()
    ids = IDS[:2, :12]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_refining_the_previous_components_finds_the_leading_eigenvectors():
    """The cheap step between batches: subspace iteration from the last components converges
    to the covariance's leading eigenvectors and their exact ratios."""
    from rankwise.adapters.eva import principal_components, refine

    gen = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.tensor([4.0, 3.0, 2.0, 1.5]), torch.linspace(0.5, 0.1, 20)])
    x = torch.randn(400, 24, generator=gen, dtype=torch.float64) * scales.double()
    cov = x.T @ x / 400
    exact, share = principal_components(cov)
    start = exact[:4] + 0.05 * torch.randn(4, 24, generator=gen, dtype=torch.float64)
    rows, found = refine(cov, torch.linalg.qr(start.T).Q.T, iterations=30)
    assert principal_cosine(rows, exact[:4]) > 1 - 1e-9
    torch.testing.assert_close(found, share[:4])
