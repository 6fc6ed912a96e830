"""RadarGate has its paper's properties: pairwise rotations of each expert's output, angles
from x and the fused experts, a stretch gate, and a start at the softmax-weighted sum."""

from __future__ import annotations

import math

import pytest
import torch
from architectures import VOCAB, tiny_model
from conftest import tiny_llama

from rankwise.mixture import build_mixture, load_mixture, save_mixture
from rankwise.routers.radargate import rotate_pairs, rotation_matrix

TARGETS = ["q_proj", "v_proj"]


def radargate(num: int = 3, angles: float = 0.0, **settings):
    """A RadarGate mixture on a tiny Llama with random experts (B != 0), random fusion and
    angle generator scaled by ``angles`` (0: as built)."""
    model = tiny_llama(layers=2)
    torch.manual_seed(0)
    built = build_mixture(
        model, "radargate", {"target_modules": TARGETS, "num_experts": num, **settings}
    )
    with torch.no_grad():
        for layer in built.layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.1)
            if angles:
                layer.policy.angle_up.normal_(std=angles)
                layer.policy.fuse.normal_()
    return model, built


def term(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's low-rank term alone (added to a zero base output)."""
    return layer.policy(layer, x, None, x.new_zeros(*x.shape[:-1], layer.out_features))


def first(built):
    layer = built.layers["model.layers.0.self_attn.v_proj"]
    return layer, layer.policy


@pytest.mark.parametrize("width", [8, 7])
def test_pair_rotations_are_block_diagonal_orthogonal_and_keep_norms(width):
    theta = torch.randn(width // 2)
    rot = rotation_matrix(theta, width)
    torch.testing.assert_close(rot @ rot.T, torch.eye(width), atol=1e-5, rtol=0)
    assert math.isclose(torch.linalg.det(rot).item(), 1.0, rel_tol=1e-4)
    v = torch.randn(width)
    torch.testing.assert_close(rotate_pairs(v, theta), rot @ v)
    batch, angles = torch.randn(4, 3, width), torch.randn(4, 3, width // 2)
    torch.testing.assert_close(rotate_pairs(batch, angles).norm(dim=-1), batch.norm(dim=-1))


def test_a_fresh_radargate_is_the_softmax_weighted_sum():
    """P = 0: every angle is zero, and the layer equals the softmax router on the same experts."""
    model, built = radargate()
    layer, router = first(built)
    assert (router.angle_up == 0).all()
    x = torch.randn(2, 5, layer.in_features)
    weights = torch.softmax(router.stretch(x), -1)
    expected = (layer.down(x) * layer.rank_gate(weights)) @ layer.lora_B.T
    torch.testing.assert_close(term(layer, x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(router.last_gates.sum(-1), torch.ones(2, 5))
    settings = {"target_modules": TARGETS, "num_experts": 3}
    plain = build_mixture(tiny_llama(layers=2), "softmax", settings)
    twin = plain.layers["model.layers.0.self_attn.v_proj"]
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
        twin.lora_B.copy_(layer.lora_B)
        twin.policy.gate.weight.copy_(router.stretch.weight)
    torch.testing.assert_close(term(twin, x), term(layer, x), atol=1e-6, rtol=1e-5)


def test_rank_space_angles_equal_the_explicit_rotations():
    """The forward (fused map in rank space, angles by pair) equals the explicit form (fused
    representations in the output space, one rotation matrix per expert and token)."""
    _, built = radargate(angles=0.5)
    layer, router = first(built)
    x = torch.randn(2, 3, layer.in_features)
    weights = torch.softmax(router.stretch(x), -1)
    outputs, rotated = router.expert_views(layer, x)  # (B, T, E, out)
    fused = torch.einsum("ij,btjd->btid", router.fuse, outputs)
    z = router.angle_in(x).unsqueeze(-2) + fused @ router.angle_out.weight.T
    theta = z @ router.angle_up.T
    explicit = torch.stack(
        [
            torch.stack(
                [rotation_matrix(theta[b, t, i], layer.out_features) @ outputs[b, t, i]
                 for i in range(layer.num_experts)]
            )
            for b in range(2) for t in range(3)
        ]
    ).view_as(rotated)  # fmt: skip
    torch.testing.assert_close(rotated, explicit, atol=1e-5, rtol=1e-4)
    assert theta.abs().max() > 0.1  # the angles are far from zero
    expected = (weights.unsqueeze(-1) * explicit).sum(-2)
    torch.testing.assert_close(term(layer, x), expected, atol=1e-5, rtol=1e-4)


def test_rotations_keep_each_expert_output_norm():
    _, built = radargate(angles=1.0)
    layer, router = first(built)
    outputs, rotated = router.expert_views(layer, torch.randn(6, layer.in_features))
    torch.testing.assert_close(rotated.norm(dim=-1), outputs.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated, outputs, atol=1e-3)


def test_output_can_leave_the_cone_and_the_span_of_the_expert_outputs():
    """A gated sum lies in the cone of the experts' outputs; the rotations take it out of their
    span altogether (E = 3 directions in a 32-dimensional output)."""
    _, built = radargate(angles=1.0)
    layer, router = first(built)
    x = torch.randn(1, layer.in_features)
    outputs = router.expert_views(layer, x)[0][0]  # (E, out): independent directions
    y = term(layer, x)[0]
    fit = torch.linalg.lstsq(outputs.T, y.unsqueeze(-1)).solution[:, 0]
    residual = (y - fit @ outputs).norm() / y.norm()
    assert residual > 0.1  # outside the span, hence outside the cone
    with torch.no_grad():
        router.angle_up.zero_()
    y = term(layer, x)[0]
    fit = torch.linalg.lstsq(outputs.T, y.unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(fit @ outputs, y, atol=1e-5, rtol=1e-4)  # in the span
    torch.testing.assert_close(fit, router.last_gates[0], atol=1e-4, rtol=1e-3)  # the weights
    assert (fit >= 0).all()  # inside the cone


def test_b_zero_gives_finite_gradients_and_b_learns():
    _, built = radargate(angles=0.5)
    layer, router = first(built)
    with torch.no_grad():
        layer.lora_B.zero_()
    term(layer, torch.randn(4, layer.in_features)).sum().backward()
    params = [layer.lora_A, layer.lora_B, *router.parameters()]
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("write", ["lora_B", "policy.fuse", "policy.angle_out.weight"])
def test_inference_keeps_the_fused_map_until_its_sources_change(write):
    _, built = radargate(angles=0.5)
    layer, router = first(built)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        before = term(layer, x)
        kept = {name: value for name, (_, value) in router.kept.items()}
        torch.testing.assert_close(term(layer, x), before)
        assert all(router.kept[name][1] is value for name, value in kept.items())
        layer.get_parameter(write).mul_(2.0)  # in place, as an optimizer step or a load
        changed = term(layer, x)
    torch.testing.assert_close(changed, term(layer, x).detach())  # formed afresh
    assert not torch.allclose(changed, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_trains_saves_and_loads_on_architectures(arch, tmp_path):
    model = tiny_model(arch)
    torch.manual_seed(0)
    built = build_mixture(model, "radargate", {"num_experts": 3, "expert_rank": 2})
    tokens = torch.randint(3, VOCAB, (2, 12))
    optimizer = torch.optim.AdamW(built.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(layer.policy.angle_up.abs().max() > 0 for layer in built.layers.values())
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    save_mixture(built, tmp_path / "mix")
    fresh = tiny_model(arch)
    load_mixture(fresh, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tokens).logits, expected, atol=0, rtol=0)


def test_an_odd_output_width_keeps_its_last_coordinate_unturned():
    from rankwise.adapters.layer import ExpertSpec, LowRankExperts
    from rankwise.routers.radargate import RadarGate, RadarGateOptions

    layer = LowRankExperts(torch.nn.Linear(8, 7), [ExpertSpec(2, 4.0)] * 3)
    layer.policy = RadarGate(layer, RadarGateOptions(expert_rank=2, num_experts=3), 0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.policy.angle_up.normal_()
    x = torch.randn(5, 8)
    weights = torch.softmax(layer.policy.stretch(x), -1)
    outputs, rotated = layer.policy.expert_views(layer, x)
    torch.testing.assert_close(rotated[..., -1], outputs[..., -1])
    expected = (weights.unsqueeze(-1) * rotated).sum(-2)
    torch.testing.assert_close(term(layer, x), expected, atol=1e-5, rtol=1e-4)


def test_contrast_correlates_each_layers_pair_angles_with_their_change():
    """Close pairs drawn closer and distant ones pushed apart is a positive correlation; pairs
    are taken per layer, never averaged over layers."""
    from rankwise.mixture.inspect import Report

    def grid(a01: float, a02: float, a12: float) -> list[list[float]]:
        return [[0, a01, a02], [a01, 0, a12], [a02, a12, 0]]

    before = {"t": {"l0": grid(0.2, 1.0, 1.4), "l1": grid(1.2, 0.4, 0.8)}}
    after = {"t": {"l0": grid(0.1, 1.0, 1.6), "l1": grid(1.3, 0.3, 0.8)}}  # contrastive
    report = Report(angles_before=before, angles_after=after)
    x, y = report.pairs("t")
    assert x.tolist() == pytest.approx([0.2, 1.0, 1.4, 1.2, 0.4, 0.8])
    assert y.tolist() == pytest.approx([-0.1, 0.0, 0.2, 0.1, -0.1, 0.0], abs=1e-6)
    assert report.contrast("t") > 0.9 and report.contrast() == report.contrast("t")
    flipped = Report(angles_before=after, angles_after=before)  # attraction of distant pairs
    assert flipped.contrast() < 0
