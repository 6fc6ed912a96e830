"""Each router's gates have its paper's properties, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from rankwise.adapters import LoraConfig, inject_adapter, save_adapter
from rankwise.adapters.layer import ExpertSpec, LowRankExperts
from rankwise.errors import RankwiseError
from rankwise.mixture import build_mixture, router_options
from rankwise.routers import base
from rankwise.routers.base import routed_sum
from rankwise.routers.mola import pattern_counts


def mixture(router: str, **settings):
    model = tiny_llama(layers=4)
    torch.manual_seed(0)
    built = build_mixture(model, router, {"target_modules": ["q_proj", "v_proj"], **settings})
    for layer in built.layers.values():  # B != 0 so every expert's output matters
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model, built


def term(router, layer: LowRankExperts, x: torch.Tensor) -> torch.Tensor:
    """The router's low-rank term alone (added to a zero base output)."""
    return router(layer, x, None, x.new_zeros(*x.shape[:-1], layer.base.out_features))


def saved_adapters(folder, count: int, std: float, layers: int = 2) -> list[str]:
    """``count`` rank-2 q_proj adapters for tiny_llama(layers), B ~ N(0, std), saved as PEFT."""
    folders = []
    for seed in range(count):
        donor = tiny_llama(layers=layers)
        torch.manual_seed(seed)
        for layer in inject_adapter(donor, LoraConfig(r=2, target_modules=["q_proj"])).values():
            torch.nn.init.normal_(layer.lora_B, std=std)
        folders.append(str(save_adapter(donor, folder / f"a{seed}")))
    return folders


def run(model, tokens):
    return model(tokens).logits


def test_mola_top_k_renormalised_and_pattern(tokens):
    model, built = mixture("mola", expert_pattern="2,4,6,8", top_k=2)
    counts = [layer.num_experts for layer in built.layers.values()]
    assert counts == [2, 2, 4, 4, 6, 6, 8, 8]  # q_proj and v_proj of blocks 0..3
    assert pattern_counts("2,4", 6) == [2, 2, 2, 4, 4, 4]
    run(model, tokens)
    for router in built.routers.values():
        gates = router.last_gates
        assert ((gates > 0).sum(-1) == 2).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_mola_aux_loss_is_switch_loss(tokens):
    model, built = mixture("mola", num_experts=4, aux_coef=0.001)
    run(model, tokens)
    loss = built.aux_loss()
    assert loss.requires_grad
    expected = 0.0
    for block in range(4):  # one loss per block over the tokens of its routers (q and v) joined
        probs = torch.cat(
            [built.routers[f"model.layers.{block}.self_attn.{m}_proj"].last_probs for m in "qv"]
        ).reshape(-1, 4)
        top = probs.topk(2, dim=-1).indices
        share = torch.zeros(4).index_add(0, top.reshape(-1), torch.ones(top.numel())) / top.numel()
        expected += 0.001 * 4 * (share * probs.mean(0)).sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("grouped", [False, True])
def test_routed_sum_is_the_gated_sum_either_way(monkeypatch, grouped):
    """Grouped dispatch and the dense masked product give the same output and gradients."""
    monkeypatch.setattr(base, "GROUPED_MIN_SKIPPED_RANKS", 0 if grouped else 10**9)
    monkeypatch.setattr(base, "GROUPED_MIN_TOKENS", 0)
    experts = LowRankExperts(torch.nn.Linear(8, 6), [ExpertSpec(2, 4.0)] * 3)
    torch.nn.init.normal_(experts.lora_B)
    assert base.grouped(experts, 2, 5) == grouped
    x, into = torch.randn(5, 8), torch.randn(5, 6)
    weights = torch.rand(5, 2)
    chosen = torch.tensor([[0, 1]] * 5)
    gates = torch.zeros(5, 3).scatter(-1, chosen, weights)
    expected = (
        into + ((x @ experts.lora_A.T) * gates.repeat_interleave(2, -1) * 2.0) @ experts.lora_B.T
    )
    out = routed_sum(experts, x, gates, chosen, into)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert (experts.lora_A.grad[experts.expert_slice(2)] == 0).all()  # unchosen: no gradient
    assert (experts.lora_B.grad[:, experts.expert_slice(2)] == 0).all()
    if grouped:
        with torch.no_grad():
            experts.lora_A[experts.expert_slice(2)] = float("nan")  # never chosen: never runs
        assert torch.isfinite(routed_sum(experts, x, gates, chosen, into)).all()


def test_grouped_dispatch_only_where_much_rank_work_is_skipped():
    def layer(num: int, rank: int) -> LowRankExperts:
        return LowRankExperts(torch.nn.Linear(4, 4), [ExpertSpec(rank, 1.0)] * num)

    assert not base.grouped(layer(4, 8), 2, 4096)  # MoLA's 4 x r8 top-2: dense
    assert base.grouped(layer(16, 64), 2, 4096)  # 448 ranks skipped per chosen expert
    assert not base.grouped(layer(16, 64), 2, 16)  # but too few tokens (decoding)
    assert not base.grouped(layer(4, 64), 4, 4096)  # every expert chosen: nothing to skip


def test_smora_sigmoid_gates_bias_and_balancing(tokens):
    model, built = mixture("smora", rank=16, top_k=4, bias_rate=0.01)
    model.train()
    run(model, tokens)
    for name, router in built.routers.items():
        gates = router.last_gates  # (B, T, R)
        assert ((gates > 0).sum(-1) == 4).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))
        x = torch.randn(3, built.layers[name].base.in_features)
        scores = torch.sigmoid(router.gate(x))
        assert ((scores > 0) & (scores < 1)).all()
        assert not router.bias.requires_grad
    router = next(iter(built.routers.values()))
    load = router.load.clone()
    built.after_step()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.bias, expected)
    assert router.load.sum() == 0
    # The bias changes which ranks are picked, not their weights' normalisation.
    with torch.no_grad():
        router.bias[:] = torch.arange(16.0) * 10
    run(model, tokens)
    assert set(router.last_gates.nonzero()[:, -1].tolist()) == {12, 13, 14, 15}


def test_smora_active_ranks_scale_as_a_lora_of_rank_k():
    """The k chosen ranks weigh alpha * normalised gate (official code: k ĝ times alpha / k)."""
    model, built = mixture("smora", rank=16, top_k=4, lora_alpha=8.0)
    layer = built.layers["model.layers.0.self_attn.q_proj"]
    router = layer.policy
    x = torch.randn(5, layer.base.in_features)
    with torch.no_grad():
        scores = torch.sigmoid(router.gate(x))
        chosen = (scores + router.bias).topk(4, dim=-1).indices
        picked = scores.gather(-1, chosen)
        gate = torch.zeros_like(scores).scatter(-1, chosen, picked / picked.sum(-1, keepdim=True))
        expected = (x @ layer.lora_A.T * gate * 8.0) @ layer.lora_B.T
        torch.testing.assert_close(term(router, layer, x), expected)


def test_flylora_frozen_sparse_a_and_zero_grad_for_unselected_b(tokens):
    model, built = mixture("flylora", rank=16, top_k=4)
    model.train()
    layer = built.layers["model.layers.0.self_attn.v_proj"]  # q has no effect on one token
    router = layer.policy
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    density = (layer.lora_A != 0).float().mean().item()
    assert density == 0.25  # k / r of every row
    assert list(router.parameters()) == []
    before = layer.lora_A.clone()
    model(tokens[:1, :1]).logits.sum().backward()  # one token: exactly k ranks chosen
    chosen = router.last_gates.reshape(-1, 16)[0] > 0
    assert chosen.sum() == 4
    assert (layer.lora_B.grad[:, ~chosen] == 0).all()
    assert (layer.lora_B.grad[:, chosen] != 0).any()
    assert layer.lora_A.grad is None and torch.equal(layer.lora_A, before)
    # The bias moves only with training forwards.
    model.eval()
    router.load.zero_()
    run(model, tokens)
    assert router.load.sum() == 0


@pytest.mark.parametrize("router", ["flylora", "radargate"])
def test_training_after_inference_mode_uses_fresh_or_normal_kept_tensors(router, tokens):
    """What routers keep between inference forwards never breaks a later training step."""
    settings = {"rank": 8, "top_k": 2} if router == "flylora" else {"num_experts": 3}
    model = tiny_llama(layers=2).to(torch.bfloat16)  # kept casts of the fp32 factors
    built = build_mixture(model, router, {"target_modules": ["q_proj"], **settings})
    with torch.inference_mode():
        before = run(model, tokens)
    model.train()
    run(model, tokens).sum().backward()  # FlyLoRA's frozen A is kept even while training
    assert all(layer.lora_B.grad is not None for layer in built.layers.values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(model, tokens), before.clone(), atol=0.05, rtol=0)


def test_xlora_trains_only_classifier_and_top_k_runs_only_chosen(monkeypatch, tmp_path, tokens):
    folders = saved_adapters(tmp_path, 3, std=0.1, layers=4)
    model = tiny_llama(layers=4)
    base_logits = model(tokens).logits
    built = build_mixture(model, "xlora", {"adapters": folders, "top_k": 1, "layerwise": True})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set()  # the classifier lives in the head, outside the model
    assert {id(p) for p in built.parameters()} == {id(p) for p in built.head.parameters()}
    out = model(tokens).logits
    assert not torch.allclose(out, base_logits)
    for router in built.routers.values():
        gates = router.last_gates
        assert ((gates > 0).sum(-1) == 1).all() and torch.allclose(gates.sum(-1), torch.ones(1))
    out.sum().backward()
    assert all(p.grad is not None for p in built.head.parameters())
    layer = next(iter(built.layers.values()))
    assert layer.lora_A.grad is None
    # With grouped dispatch an expert no token chooses never runs: poison it everywhere and the
    # output is unchanged (the dense product, used for these small ranks, gives the same output).
    monkeypatch.setattr(base, "GROUPED_MIN_SKIPPED_RANKS", 0)
    monkeypatch.setattr(base, "GROUPED_MIN_TOKENS", 0)
    with torch.no_grad():
        built.head.classifier[-1].bias.view(-1, 3)[:, 2] = -1e4  # (layers, experts)
        expected = model(tokens).logits
        for layer in built.layers.values():
            layer.lora_A[layer.expert_slice(2)] = float("nan")
        torch.testing.assert_close(model(tokens).logits, expected)


def test_config_errors():
    with pytest.raises(RankwiseError, match="unknown router"):
        router_options("nope")
    with pytest.raises(RankwiseError, match="adapters"):
        router_options("xlora")
    with pytest.raises(RankwiseError, match="top_k"):
        router_options("smora", {"rank": 4, "top_k": 8})


def test_xlora_scaling_pass_value_changes_the_first_pass(tmp_path, tokens):
    folders = saved_adapters(tmp_path, 2, std=0.3)
    logits = []
    for value in (0.0, 1.0):
        model = tiny_llama()
        torch.manual_seed(0)
        build_mixture(model, "xlora", {"adapters": folders, "scaling_pass_value": value})
        logits.append(model(tokens).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


@pytest.mark.parametrize("pass_value", [0.0, 1.0])
def test_xlora_generation_with_kv_cache_equals_full_recompute(tmp_path, tokens, pass_value):
    folders = saved_adapters(tmp_path, 2, std=0.3)
    model = tiny_llama()
    torch.manual_seed(0)
    build_mixture(model, "xlora", {"adapters": folders, "scaling_pass_value": pass_value})
    runs = [
        model.generate(
            tokens[:, :5],
            max_new_tokens=6,
            do_sample=False,
            use_cache=cache,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )  # fmt: skip
        for cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, full in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["gaussian", "init_b"])
def test_rank_experts_initialise_as_one_lora_of_rank_r(scheme):
    """SMoRA's R rank-1 experts start like one rank-R LoRA: A ~ N(0, 1/R^2), B's fan-in R."""
    settings = {"rank": 16, "top_k": 4, "init": scheme, "target_modules": ["q_proj"]}
    layer = build_mixture(tiny_llama(), "smora", settings).layers["model.layers.0.self_attn.q_proj"]
    if scheme == "gaussian":
        assert abs(layer.lora_A.std().item() - 1 / 16) < 0.01
    else:  # Kaiming-uniform with a = sqrt(5) over fan-in R: bound 1 / sqrt(R)
        assert layer.lora_B.abs().max().item() <= 1 / 4 + 1e-6
        assert layer.lora_B.abs().max().item() > 0.2
