"""``resize``: the dense model at a lower input resolution (trivial baseline)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import bench
from tests.helpers import images, small_vit


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit3_small_patch16_224"])  # class pos-embed or not
def test_resize_at_the_models_own_size_is_the_dense_model(name):
    vit = small_vit(name)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(bench.apply(vit, "resize", img_size=64)(x), vit(x))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit3_small_patch16_224",
                                  "deit_tiny_distilled_patch16_224", "vit_base_patch16_reg4_gap_256"])
def test_resize_equals_timms_dynamic_size_model_on_resized_images(name):
    vit = small_vit(name)
    dynamic = timm.create_model(name, pretrained=False, img_size=64, patch_size=8, num_classes=10,
                                dynamic_img_size=True).eval()
    dynamic.load_state_dict(vit.state_dict())
    x = images(2)
    small = F.interpolate(x, size=(40, 40), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        got = bench.apply(vit, "resize", img_size=40)(x)
        expected = dynamic(small)
        dense = vit(x)
    scale = dense.abs().max()  # DeiT-III's LayerScale starts tiny: compare relative to the logits
    assert (got - expected).abs().max() < 1e-4 * scale
    assert (got - dense).abs().max() > 0.05 * scale


def test_resize_macs_are_the_dense_models_at_that_size():
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    at_160 = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=160)
    macs = bench.count_macs(bench.apply(vit, "resize", img_size=160))
    assert macs == bench.count_macs(bench.apply(at_160, "baseline"))
    assert macs < 0.55 * bench.count_macs(bench.apply(vit, "baseline"))


def test_resize_refuses_sizes_that_are_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        bench.apply(small_vit(), "resize", img_size=60)
    model = bench.apply(small_vit(), "resize", img_size=64)
    assert model.method.budget_choices(model.context) == [8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match=r"img_size=72 is larger than the model's input size \(allowed: \.\.\., "
                                         r"40, 48, 56, 64\)"):  # an upscaling is not a reduction
        bench.apply(small_vit(), "resize", img_size=72)


def test_resize_refuses_a_non_square_model_and_its_budgets_are_unreachable():
    """Squashing a 48x64 input to img_size x img_size changes its aspect ratio (user test 6: a <=0.90 budget cell
    landed at 0.695 of the dense MACs); a fixed size is one error, a MAC budget unreachable with the reason."""
    from bench.pipeline.calibrate import Calibrator

    wide = small_vit(img_size=(48, 64))
    with pytest.raises(ValueError, match=r"method 'resize': needs a square input \(this model's: 48x64\); it "
                                         r"resizes to img_size x img_size"):
        bench.apply(wide, "resize", img_size=32)
    result = Calibrator(wide, identity=["wide"]).calibrate("resize", {}, 0.6)
    assert not result.reachable and "needs a square input (this model's: 48x64)" in result.reason


def test_a_hybrid_vit_is_refused_at_another_input_size_and_maps_its_own_grid():
    """A hybrid embedding (a ResNet before the patch projection: 4 x 4 tokens at 128 px, stride 32, although its
    projection's patch is 8) embeds its own input size only: ``resize`` is refused when it is applied, another
    input size at the forward; at its own size methods run, and the token map has the real grid."""
    from bench.pipeline.stages.tokens import patch_grid, token_maps

    torch.manual_seed(0)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=128, num_classes=10).eval()
    with pytest.raises(ValueError, match=r"method 'resize': needs an embedding that takes other input sizes; this "
                                         r"model's runs a CNN backbone .* \(a hybrid ViT\) and takes 128x128 only"):
        bench.apply(hybrid, "resize", img_size=64)
    # a MAC budget of resize is out of reach with that reason (it stopped the whole experiment: every size it
    # offered, multiples of the stride, failed when applied)
    from bench.pipeline.calibrate import Calibrator

    result = Calibrator(hybrid, identity=["hybrid"]).calibrate("resize", {}, 0.7)
    assert not result.reachable and "(a hybrid ViT) and takes 128x128 only" in result.reason
    tome = bench.apply(hybrid, "tome", r=4)
    x = images(2, size=128)
    with torch.no_grad():
        assert tome(x).shape == (2, 10) and tome.last_forward.tokens_out[-1] < 17
        with pytest.raises(ValueError, match="input 96x96: this model's HybridEmbed"):
            tome(images(2, size=96))
    assert tome.context.patch_size == (32, 32) and patch_grid(tome) == (4, 4)
    layers, labels = token_maps(tome, x, "fp32")
    assert labels.shape == (2, len(layers), 4, 4)
