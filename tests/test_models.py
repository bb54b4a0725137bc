import pytest
import torch

from trainables.networks.models import PreResNet, make_model


@pytest.mark.parametrize(
    "name,shape,feat",
    [
        ("cnn", (1, 8, 8), 128),
        ("cnn", (1, 28, 28), 128),
        ("linear", (3, 32, 32), 3072),
        ("preresnet20", (3, 32, 32), 64),
        ("preresnet8", (1, 28, 28), 64),
    ],
)
def test_models_expose_penultimate_features(name, shape, feat):
    m = make_model(name, shape, 10).eval()
    x = torch.randn(4, *shape)
    f = m.features(x)
    assert f.shape == (4, feat)
    torch.testing.assert_close(m.head(f), m(x))
    assert m.piecewise_linear


def test_preresnet_depths():
    n_blocks = lambda d: len(PreResNet(d, (3, 32, 32), 10).blocks)  # noqa: E731
    assert n_blocks(20) == 9 and n_blocks(110) == 54
    with pytest.raises(ValueError, match="6n\\+2"):
        PreResNet(21, (3, 32, 32), 10)
