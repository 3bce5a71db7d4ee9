import pytest
import torch

from fedpsg.nn.models import ConvNet, available_models, build_model


def test_convnet_matches_the_papers_architecture():
    model = build_model("convnet", 1, 10, (28, 28), width=128, depth=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 3 and all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    # instance norm = one group per channel, with affine parameters
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in model.modules())
    assert model.classifier.in_features == 128 * 4 * 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", available_models())
def test_registry_builds_every_model(name):
    model = build_model(name, 1, 10, (28, 28), width=16)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_width_depth_configurable_and_unknown_rejected():
    model = build_model("convnet", 3, 7, (32, 32), width=8, depth=2)
    assert isinstance(model, ConvNet)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet1000", 1, 10, (28, 28))


def test_kaiming_init_scale():
    torch.manual_seed(0)
    conv = build_model("convnet", 1, 10, (28, 28), width=128).features[4]
    fan_in = 128 * 9
    # kaiming-uniform with gain sqrt(2): std = sqrt(2 / fan_in)
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    assert float(conv.bias.detach().abs().max()) == 0.0
