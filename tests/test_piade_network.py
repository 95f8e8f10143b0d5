"""gaussad.piade.network: shapes through every block, the SE block, initialisation, routing and squash
against a loop-by-loop Algorithm 1, and which vector is decoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaussad.networks import build_model
from gaussad.piade.network import CapsuleRouting, PiadeNet, SEBlock, squash


@pytest.fixture(scope="module")
def resnet_net():
    return PiadeNet("resnet18", "none", image_size=120).eval()


def test_shapes_through_every_block_at_120px(resnet_net):
    net = resnet_net
    images = torch.rand(2, 3, 120, 120)
    with torch.no_grad():
        stages = net.trunk(images)
        assert [tuple(s.shape) for s in stages] == [(2, 64, 30, 30), (2, 128, 15, 15), (2, 256, 8, 8), (2, 512, 4, 4)]
        assert net.mf == 4
        levels = [tuple(level(stages[-1]).shape) for level in net.pyramid.levels]
        assert levels == [(2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2), (2, 64, 1, 1)]
        capsules = net.pyramid(stages[-1])
        assert capsules.shape == (2, 64 * (64 + 16 + 4 + 1) // 8, 8) == (2, 680, 8)
        vectors, coefficients = net.routing(capsules)
        assert vectors.shape == (2, 2, 64) and coefficients.shape == (2, 680, 2)
        upsampled = net.upsampler(vectors[:, 0])
        assert upsampled.shape == (2, 512, 4, 4)
        decoded = net.decoder(torch.cat([stages[-1], upsampled], 1))
        assert decoded.shape == (2, 3, 120, 120)
        output = net(images)
    assert output.reconstruction.shape == (2, 3, 120, 120)
    assert 0 <= output.reconstruction.min() and output.reconstruction.max() <= 1  # sigmoid output


def test_lite0_trunk_has_an_se_block_after_each_of_its_seven_stages():
    net = PiadeNet("tf_efficientnet_lite0", "none", image_size=120)
    assert len(net.trunk.stages) == len(net.trunk.se) == 7
    with torch.no_grad():
        stages = net.trunk(torch.rand(1, 3, 120, 120))
    assert tuple(stages[-1].shape) == (1, 320, 4, 4) and net.mf == 4
    assert [s.shape[1] for s in stages] == [se.w2.out_features for se in net.trunk.se]


def test_se_block_reweights_channels_as_eq_2():
    block = SEBlock(8, reduction=4)
    u = torch.randn(3, 8, 5, 5)
    z = u.mean((2, 3)).numpy()
    w1, w2 = block.w1.weight.detach().numpy(), block.w2.weight.detach().numpy()
    assert w1.shape == (2, 8) and w2.shape == (8, 2)
    s = 1 / (1 + np.exp(-(np.maximum(z @ w1.T, 0) @ w2.T)))
    np.testing.assert_allclose(block(u).detach().numpy(), u.numpy() * s[:, :, None, None], rtol=1e-5, atol=1e-6)


def test_new_layers_are_orthogonal_and_the_trunk_is_not_reinitialised(resnet_net):
    linear = resnet_net.upsampler.layers[0].weight.detach()  # 128 x 64: orthonormal columns
    torch.testing.assert_close(linear.T @ linear, torch.eye(64), atol=1e-5, rtol=0)
    conv = resnet_net.pyramid.levels[0][1].weight.detach().flatten(1)  # 64 x 512: orthonormal rows
    torch.testing.assert_close(conv @ conv.T, torch.eye(64), atol=1e-5, rtol=0)
    w = resnet_net.routing.weight.detach().reshape(-1, 64, 8)
    torch.testing.assert_close(w.transpose(1, 2) @ w, torch.eye(8).expand(len(w), 8, 8), atol=1e-5, rtol=0)
    trunk_conv = build_model("resnet18", "none", seed=0).conv1.weight
    torch.testing.assert_close(resnet_net.trunk.stem[0].weight.detach(), trunk_conv)



# ---- routing and squash ----------------------------------------------------------------------------


def reference_routing(u_hat: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 for one image, loop by loop in float64: u_hat [out, in, dim] -> v [out, dim], c [in, out]."""
    n_out, n_in, _ = u_hat.shape
    b = np.zeros((n_in, n_out))
    for _ in range(iterations):
        c = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        v = []
        for j in range(n_out):
            s = sum(c[i, j] * u_hat[j, i] for i in range(n_in))
            norm2 = s @ s
            v.append(norm2 / (1 + norm2) * s / np.sqrt(norm2))
        for i in range(n_in):
            for j in range(n_out):
                b[i, j] += u_hat[j, i] @ v[j]
    return np.array(v), c


def test_routing_matches_algorithm_1_and_its_coefficients_sum_to_one():
    torch.manual_seed(0)
    routing = CapsuleRouting(n_in=12, in_dim=4, n_out=2, out_dim=6, iterations=3)
    torch.nn.init.normal_(routing.weight, std=0.3)
    u = torch.randn(3, 12, 4)
    vectors, coefficients = routing(u)
    torch.testing.assert_close(coefficients.sum(2), torch.ones(3, 12))
    assert (coefficients >= 0).all()
    u_hat = torch.einsum("jiok,nik->njio", routing.weight, u).detach().double().numpy()
    for image in range(3):
        v, c = reference_routing(u_hat[image], iterations=3)
        np.testing.assert_allclose(vectors[image].detach().numpy(), v, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(coefficients[image].detach().numpy(), c, rtol=1e-4, atol=1e-6)


def test_squash_keeps_norms_in_zero_one_even_for_huge_inputs():
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
    norms = torch.tensor([0.0, 1e-6, 0.1, 0.5, 1.0, 3.0, 1e2, 1e4, 1e6, 1e9, 1e15])
    out = squash(norms[:, None] * direction)
    out_norms = out.norm(dim=1)
    assert torch.isfinite(out).all()
    assert (out_norms >= 0).all() and (out_norms < 1).all()
    expected = norms.double() ** 2 / (1 + norms.double() ** 2)  # eq. 3 with a = 1
    np.testing.assert_allclose(out_norms[:8].numpy(), expected[:8].numpy(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.nn.functional.normalize(out[2:], dim=1), direction.expand(9, 64))


def test_training_decodes_the_first_vector_and_testing_the_longest(resnet_net):
    net = resnet_net
    vectors = torch.zeros(2, 2, 64)
    vectors[0, 0, 0], vectors[0, 1, 1] = 0.3, 0.9  # image 0: the second vector is longer
    vectors[1, 0, 2], vectors[1, 1, 3] = 0.8, 0.2  # image 1: the first is
    net.train()
    torch.testing.assert_close(net.select_vector(vectors), vectors[:, 0])
    net.eval()
    torch.testing.assert_close(net.select_vector(vectors), torch.stack([vectors[0, 1], vectors[1, 0]]))

    class FixedRouting(torch.nn.Module):
        def forward(self, capsules):
            return vectors, torch.full((len(capsules), capsules.shape[1], 2), 0.5)

    decoded = []
    hook = net.upsampler.register_forward_hook(lambda module, inputs, output: decoded.append(inputs[0]))
    routing, net.routing = net.routing, FixedRouting()
    try:
        with torch.no_grad():
            net(torch.rand(2, 3, 120, 120))
    finally:
        net.routing = routing
        hook.remove()
    torch.testing.assert_close(decoded[0], torch.stack([vectors[0, 1], vectors[1, 0]]))
