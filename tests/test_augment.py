import torch

from fedpsg.data.augment import crop_scale_rotate


def test_shapes_kept_and_deterministic_with_a_generator():
    images = torch.randn(16, 1, 28, 28)
    a = crop_scale_rotate(images, torch.Generator().manual_seed(0))
    b = crop_scale_rotate(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, images)


def test_zero_strength_is_identity():
    images = torch.randn(8, 1, 28, 28)
    out = crop_scale_rotate(images, torch.Generator().manual_seed(1), crop=0, scale=0.0, rotate=0.0)
    assert torch.allclose(out, images, atol=1e-5)


def test_shift_moves_content_by_whole_pixels():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 14] = 1.0
    out = crop_scale_rotate(image.repeat(64, 1, 1, 1), torch.Generator().manual_seed(2), scale=0.0, rotate=0.0)
    # every output still has a single bright pixel, within 4 pixels of the original position
    for img in out[:, 0]:
        y, x = divmod(int(img.argmax()), 28)
        assert abs(y - 14) <= 4 and abs(x - 14) <= 4
        assert float(img.max()) > 0.99
