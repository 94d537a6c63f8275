"""HookNet and the U-Net baseline (DESIGN section 5; issue 4 item 2).

CPU only; ResNet-18 at 256 px where the published geometry is checked, 128 px elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dsf.models.dsf import DSFModel
from dsf.models.hooknet import HookNet, UNet, UNetDecoder, hook_geometry

BCSS_CLASSES = 6  # ignore + TUM, STR, LYM, NEC, OTR (DESIGN 5)
STRIDES = (2, 4, 8, 16, 32)
FOV = (96, 160)  # target field of view in context px: centre 256 / 4 of the 256 px context input


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small forwards gain little from two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hooknet() -> HookNet:
    """The published setup: ResNet-18, scale 4, 256 px inputs, BCSS classes; eval mode."""
    torch.manual_seed(0)
    return HookNet(BCSS_CLASSES).eval()


def capture_hooked(model: HookNet) -> tuple[dict[str, Tensor], torch.utils.hooks.RemovableHandle]:
    """Record the output of the hooked context decoder block on every forward."""
    seen: dict[str, Tensor] = {}

    def keep(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
        seen["map"] = out.detach()

    block = model.context_decoder.blocks[model.hook_depth - 1]
    return seen, block.register_forward_hook(keep)


def test_parameter_count_resnet18_256(hooknet: HookNet) -> None:
    # 2 x 11,176,512 encoders + 3,446,464 target decoder (512 + 128 in) + 3,151,552 context
    # decoder + 2 heads of 16 * 6 * 9 + 6 = 870 (DESIGN 5: 28,952,780).
    assert n_params(hooknet) == 28_952_780
    assert n_params(hooknet.context_encoder) == n_params(hooknet.target_encoder) == 11_176_512
    assert n_params(hooknet.target_decoder) == 3_446_464
    assert n_params(hooknet.context_decoder) == 3_151_552
    assert hooknet.target_decoder.blocks[0].conv1[0].in_channels == 512 + 128 + 256


def test_published_geometry_and_shapes(hooknet: HookNet) -> None:
    assert hooknet.hook_depth == 2 and hooknet.hook_stride == 8
    assert hooknet.hook_crop == (slice(12, 20), slice(12, 20))
    # the crop in context pixels is the centre 1/scale of the context input
    assert hooknet.geometry.box == FOV
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        target, context = hooknet(x, x)
    assert target.shape == context.shape == (2, BCSS_CLASSES, 256, 256)


def test_hook_feeds_cropped_context_map_to_target_bottleneck(hooknet: HookNet) -> None:
    seen, handle = capture_hooked(hooknet)
    bottleneck: dict[str, Tensor] = {}
    pre = hooknet.target_decoder.blocks[0].register_forward_pre_hook(
        lambda _m, args: bottleneck.__setitem__("x", args[0].detach())
    )
    try:
        with torch.no_grad():
            hooknet(torch.rand(1, 3, 256, 256), torch.rand(1, 3, 256, 256))
    finally:
        handle.remove()
        pre.remove()
    assert seen["map"].shape == (1, 128, 32, 32)
    x = bottleneck["x"]
    assert x.shape == (1, 512 + 128, 8, 8)
    torch.testing.assert_close(x[:, 512:], seen["map"][:, :, 12:20, 12:20])


def test_bright_target_area_lights_up_the_hooked_window(hooknet: HookNet) -> None:
    """Only the target's field of view of the context is bright: the response of the hooked map
    (bright minus black) is concentrated in the cropped window, and a window of the same size
    moved one window-width away responds less (ratio >= 1.36 over seeds 0-3)."""
    seen, handle = capture_hooked(hooknet)
    a, b = FOV  # not from the model: the crop must find it
    black = torch.zeros(1, 3, 256, 256)
    bright = black.clone()
    bright[..., a:b, a:b] = 3.0
    target = torch.zeros(1, 3, 256, 256)
    try:
        with torch.no_grad():
            hooknet(black, target)
            dark_map = seen["map"]
            hooknet(bright, target)
            lit_map = seen["map"]
    finally:
        handle.remove()
    response = (lit_map - dark_map).abs().mean(dim=(0, 1))  # (32, 32)
    rows, cols = hooknet.hook_crop
    inside = torch.zeros_like(response, dtype=torch.bool)
    inside[rows, cols] = True
    assert response[inside].mean() > 2.0 * response[~inside].mean()
    k = rows.stop - rows.start
    for dr, dc in ((-k, 0), (k, 0), (0, -k), (0, k)):
        shifted = response[rows.start + dr : rows.stop + dr, cols.start + dc : cols.stop + dc]
        assert response[rows, cols].mean() > 1.2 * shifted.mean()


def test_perturbing_inside_fov_moves_hooked_window_more_than_outside(hooknet: HookNet) -> None:
    seen, handle = capture_hooked(hooknet)
    rows, cols = hooknet.hook_crop
    a, b = FOV  # not from the model: the crop must find it
    w = b - a
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 256, 256, generator=gen)
    patch = torch.rand(1, 3, w, w, generator=gen)
    inside, corner = base.clone(), base.clone()
    inside[..., a:b, a:b] = patch
    corner[..., :w, :w] = patch  # same area, far outside the target's field of view
    target = torch.rand(1, 3, 256, 256, generator=gen)

    def window(context: Tensor) -> Tensor:
        with torch.no_grad():
            hooknet(context, target)
        return seen["map"][:, :, rows, cols]

    try:
        ref = window(base)
        d_in = (window(inside) - ref).abs().mean()
        d_out = (window(corner) - ref).abs().mean()
    finally:
        handle.remove()
    assert d_in > 2.0 * d_out


@pytest.mark.parametrize(
    ("kwargs", "depth", "crop", "box"),
    [
        ({"scale": 2}, 1, slice(2, 6), (32, 96)),
        ({"scale": 4}, 2, slice(6, 10), (48, 80)),
        ({"scale": 8}, 3, slice(14, 18), (56, 72)),
        ({"scale": 4, "backbone": "efficientnet_b0"}, 2, slice(6, 10), (48, 80)),
    ],
)
def test_other_geometries(
    kwargs: dict[str, object], depth: int, crop: slice, box: tuple[int, int]
) -> None:
    """128 px inputs: the target bottleneck is 4x4, the hook depth is log2(scale)."""
    torch.manual_seed(0)
    model = HookNet(3, input_size=128, **kwargs).eval()  # type: ignore[arg-type]
    assert model.hook_depth == depth
    assert model.hook_crop == (crop, crop)
    assert model.geometry.box == box
    size = 128 // model.scale
    assert box == ((128 - size) // 2, (128 + size) // 2)
    bottleneck = model.target_encoder.dims[-1]
    assert model.target_decoder.blocks[0].conv1[0].in_channels == (
        bottleneck + model.hook_channels + model.target_encoder.dims[-2]
    )
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        target, context = model(x, x)
    assert target.shape == context.shape == (1, 3, 128, 128)


def test_hook_geometry_rejects_impossible_settings() -> None:
    assert hook_geometry(4, 256, STRIDES).depth == 2
    assert hook_geometry(32, 1024, STRIDES).depth == 5
    for scale in (1, 3, 6, 64):
        with pytest.raises(ValueError, match=f"scale {scale}"):
            hook_geometry(scale, 256, STRIDES)
    with pytest.raises(ValueError, match="input_size 96"):  # fov 12 px at stride 4: start 42
        hook_geometry(8, 96, STRIDES)
    with pytest.raises(ValueError, match="input_size 100"):
        hook_geometry(4, 100, STRIDES)
    with pytest.raises(ValueError, match="scale 3"):
        HookNet(2, scale=3, input_size=128)


def test_check_hook_names_the_config_keys_and_blocks_that_fit() -> None:
    from dsf.errors import ConfigError
    from dsf.hook_geometry import ENCODER_STRIDES, check_hook

    assert ENCODER_STRIDES == STRIDES
    check_hook(256, 4)  # the paper's geometry
    with pytest.raises(ConfigError, match=r"patches.block 32 at patches.scale 4 .* 64, 128, 192"):
        check_hook(32, 4)
    with pytest.raises(ConfigError, match="patches.scale 3"):
        check_hook(256, 3)


def test_forward_rejects_other_input_size(hooknet: HookNet) -> None:
    with pytest.raises(ValueError, match="input_size 256"):
        hooknet(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 256, 256))


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = HookNet(3, input_size=128).eval()
    x, y = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = model(x, y)
        model = model.to(memory_format=torch.channels_last)
        out = model(
            x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
        )
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [2, 4])
def test_prediction_skips_the_context_decoder_past_the_hook(scale: int) -> None:
    """Without context logits (what prediction asks for) the context decoder runs only up to
    the hooked block and the context head not at all, and the target logits are unchanged."""
    torch.manual_seed(0)
    model = HookNet(3, scale=scale, input_size=128).eval()
    ran: list[str] = []
    for i, block in enumerate(model.context_decoder.blocks, start=1):
        block.register_forward_hook(lambda *_, i=i: ran.append(f"block{i}"))
    model.context_head.register_forward_hook(lambda *_: ran.append("head"))
    x, y = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        ref, ctx_logits = model(x, y)
        assert ran == ["block1", "block2", "block3", "block4", "block5", "head"]
        assert ctx_logits is not None and ctx_logits.shape == (2, 3, 128, 128)
        ran.clear()
        out, none = model(x, y, context_logits=False)
    assert ran == [f"block{i}" for i in range(1, model.hook_depth + 1)]
    assert none is None
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.fixture(scope="module")
def small_hooknet() -> HookNet:
    torch.manual_seed(0)
    return HookNet(3, input_size=128)


def test_load_encoders_from_dsf_state(small_hooknet: HookNet, tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = DSFModel("resnet18", n_blocks=4, method="simsiam").encoder_state()
    path = tmp_path / "encoders.pt"
    torch.save(state, path)
    for source in (state, path):
        small_hooknet.load_encoders(source)
        for branch, encoder in (
            ("context", small_hooknet.context_encoder),
            ("target", small_hooknet.target_encoder),
        ):
            own = encoder.state_dict()
            assert set(own) == set(state[branch])
            for key, value in state[branch].items():
                assert torch.equal(own[key], value), key
    # the two branches keep separate weights
    c = small_hooknet.context_encoder.state_dict()
    t = small_hooknet.target_encoder.state_dict()
    assert not torch.equal(c["stem.conv1.weight"], t["stem.conv1.weight"])


def test_load_encoders_rejects_other_backbone(small_hooknet: HookNet) -> None:
    state = DSFModel("resnet34", n_blocks=4, method="simsiam").encoder_state()
    before = small_hooknet.target_encoder.state_dict()["stem.conv1.weight"].clone()
    with pytest.raises(ValueError, match=r"backbone 'resnet34'.*unexpected keys \[.*layer1\.2"):
        small_hooknet.load_encoders(state)
    # without the name, the keys alone give it away
    del state["backbone"], state["dims"]
    with pytest.raises(ValueError, match=r"unexpected keys \[stages\.0\.layer1\.2"):
        small_hooknet.load_encoders(state)
    assert torch.equal(small_hooknet.target_encoder.state_dict()["stem.conv1.weight"], before)


def test_load_encoders_names_missing_and_misshaped_keys(small_hooknet: HookNet) -> None:
    state = DSFModel("resnet18", n_blocks=4, method="simsiam").encoder_state()
    key = "stages.3.layer4.1.bn2.running_var"
    missing = {**state, "target": {k: v for k, v in state["target"].items() if k != key}}
    with pytest.raises(ValueError, match=rf"target: missing keys \[{key}\]"):
        small_hooknet.load_encoders(missing)
    report = small_hooknet.load_encoders(missing, strict=False)
    assert report["target.missing"] == [key] and report["context.missing"] == []
    bad = dict(state["context"])
    bad["stem.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"context: mis-shaped \[stem\.conv1\.weight"):
        small_hooknet.load_encoders({**state, "context": bad}, strict=False)


def test_unet_baseline_shares_the_decoder(small_hooknet: HookNet) -> None:
    torch.manual_seed(0)
    unet = UNet(3).eval()
    assert type(unet.decoder) is type(small_hooknet.context_decoder) is UNetDecoder
    # one HookNet branch without the hook: encoder + context-style decoder + head
    assert n_params(unet) == 11_176_512 + 3_151_552 + (16 * 3 * 9 + 3)
    with torch.no_grad():
        out = unet(torch.rand(2, 3, 128, 128))
    assert out.shape == (2, 3, 128, 128)


def test_imagenet_weights_file_loads_into_both_encoders(tmp_path: Path) -> None:
    """The ImageNet baseline (paper Table V): a local torchvision file, nothing downloaded. A
    randomly initialised torchvision ResNet-18 stands in for the real file."""
    import torchvision

    torch.manual_seed(5)
    file_state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(file_state, path)
    torch.manual_seed(0)
    model = HookNet(3, input_size=128, weights=path)
    for encoder in (model.context_encoder, model.target_encoder):
        own = encoder.state_dict()
        assert encoder.key_map  # every stem/stage tensor came from a torchvision key
        for tv_key, our_key in encoder.key_map.items():
            assert torch.equal(own[our_key], file_state[tv_key]), tv_key
    # without the file the encoders start elsewhere (the equality above is not by chance)
    plain = HookNet(3, input_size=128)
    assert not torch.equal(
        plain.context_encoder.state_dict()["stem.conv1.weight"],
        model.context_encoder.state_dict()["stem.conv1.weight"],
    )


def test_check_unet_passes_exactly_the_blocks_the_unet_can_segment() -> None:
    """The U-Net baseline's decoder joins every encoder stage: blocks it cannot segment (a raw
    tensor-size error deep in training) are refused first, naming patches.block and blocks
    that fit."""
    from dsf.errors import ConfigError
    from dsf.hook_geometry import check_unet

    model = UNet(3).eval()
    for block in (16, 32, 48, 64, 80, 96):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, block, block))
            runs = True
        except RuntimeError:
            runs = False
        try:
            check_unet(block)
            passes = True
        except ConfigError as exc:
            assert f"patches.block {block} does not fit the U-Net" in str(exc)
            assert "use patches.block" in str(exc)
            passes = False
        assert passes == runs, block


def test_logits_are_float32_under_bf16_autocast() -> None:
    """bf16 logits tie between close classes and argmax then picks the lower index: the heads
    give float32 logits under autocast, from the same weights (state_dict keys unchanged)."""
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(0)
    model, unet = HookNet(3, input_size=128).eval(), UNet(3).eval()
    ctx, tgt = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    head_in = torch.rand(1, 16, 8, 8).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t_logits, c_logits = model(ctx, tgt)
        u_logits = unet(tgt)
        head = model.target_head(head_in)
    assert t_logits.dtype == c_logits.dtype == u_logits.dtype == torch.float32
    w, b = model.target_head.weight, model.target_head.bias
    torch.testing.assert_close(head, F.conv2d(head_in.float(), w, b, padding=1))
    assert {"target_head.weight", "target_head.bias", "head.weight"} <= set(
        model.state_dict()
    ) | set(unet.state_dict())
