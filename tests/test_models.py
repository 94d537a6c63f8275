"""DSF-WSI model: encoders, SimSiam heads and loss, CTFM/jigsaw wiring, variants (DESIGN 5).

CPU only, tiny inputs (32 px images, batch 2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision.models as tvm
from torch import Tensor, nn

from dsf.models import DSFModel, build_encoder, draw_perms, negative_cosine, simsiam_loss
from dsf.models import dsf as dsf_module
from dsf.models.dsf import GROUPS, keep_count

from conftest import DEVICE

PX = 32
B = 2
N = 16
WEIGHTS = (0.1, 0.4, 0.7, 1.0)
RESNET18_DIMS = (64, 128, 256, 512)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from two threads, and on a busy 2-core machine OpenMP threads
    waiting for each other made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DSFModel:
    torch.manual_seed(0)
    return DSFModel()


def views(batch: int = B, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, batch, 3, PX, PX, generator=g)
    targets = torch.randn(2, batch, N, 3, PX, PX, generator=g)
    return context, targets


Swap = Callable[[nn.Module, str, nn.Module], None]


@pytest.fixture
def swap() -> Iterator[Swap]:
    """Replace a submodule for one test. (monkeypatch.setattr deletes nn.Module children on undo:
    they live in `_modules`, not in the instance `__dict__`.)"""
    saved: list[tuple[nn.Module, str, nn.Module]] = []

    def _swap(owner: nn.Module, name: str, value: nn.Module) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    yield _swap
    for owner, name, value in reversed(saved):
        setattr(owner, name, value)


def identity_heads(model: DSFModel, swap: Swap) -> None:
    """p = z = the features: the loss becomes minus the mean cosine of the two views' features."""
    heads = nn.ModuleDict({key: nn.Identity() for key in model.head_dims})
    swap(model, "projectors", heads)
    swap(model, "predictors", heads)


class MeanEncoder(nn.Module):
    """Fake encoder: every stage's vector is the image mean repeated, so it identifies the image."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> list[Tensor]:
        m = x.mean(dim=(1, 2, 3)) * self.scale
        return [m.unsqueeze(1).expand(-1, c) for c in self.dims]


class MixEncoder(nn.Module):
    """Fake encoder with non-trivial directions: per stage tanh of a fixed mix of channel means."""

    def __init__(self, dims: tuple[int, ...], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.mix = nn.ParameterList([torch.randn(6, c, generator=g) for c in dims])

    def forward(self, x: Tensor) -> list[Tensor]:
        stats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return [torch.tanh(stats @ w) for w in self.mix]


# ---------------------------------------------------------------- encoders


def test_resnet18_encoder_params_and_shapes() -> None:
    enc = build_encoder("resnet18")
    assert n_params(enc) == 11_176_512
    assert enc.dims == RESNET18_DIMS
    assert not any(k.startswith("fc") for k in enc.key_map)
    x = torch.randn(2, 3, 64, 64)
    feats = enc(x)
    assert [tuple(f.shape) for f in feats] == [(2, c) for c in RESNET18_DIMS]
    maps = enc.forward_maps(x, include_stem=True)
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 32, 32),
        (2, 64, 16, 16),
        (2, 128, 8, 8),
        (2, 256, 4, 4),
        (2, 512, 2, 2),
    ]
    assert torch.allclose(feats[3], maps[4].mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "regnety_800mf", "efficientnet_b0"])
def test_backbone_counts(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage dims come from the backbone; prints the counts for the benchmark table.

    The heads are built on the meta device (exact shapes, no memory, no slow init)."""
    enc = build_encoder(name)
    maps = enc.forward_maps(torch.randn(2, 3, 64, 64))
    assert tuple(m.shape[1] for m in maps) == enc.dims
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    if name == "efficientnet_b0":
        assert enc.dims == (24, 40, 112, 320)  # the final 1280-channel conv is not a stage
    if name == "regnety_800mf":
        trunk = tvm.regnet_y_800mf().trunk_output
        widths = [blk[-1].f.c.out_channels for blk in trunk.children()]
        assert list(enc.dims) == widths
    monkeypatch.setattr(dsf_module, "build_encoder", lambda *_a, **_k: copy.deepcopy(enc))
    with torch.device("meta"):
        model = DSFModel(backbone=name)
    assert model.context_encoder is not model.target_encoder
    n_enc, n_model = n_params(enc), n_params(model)
    assert n_enc > 0 and n_model > 2 * n_enc
    assert model.head_dims["fusion4"] == 9 * enc.dims[3]
    if name == "resnet18":
        assert n_model == 123_551_584
    print(f"params {name}: {n_model} (encoder {n_enc}, heads {n_model - 2 * n_enc})")


def test_weights_file_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    tv = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18-random.pth"
    torch.save(tv.state_dict(), path)
    enc = build_encoder("resnet18", path)
    ref = tv.state_dict()
    own = enc.state_dict()
    assert len(enc.key_map) == len(ref) - 2  # all but fc.weight and fc.bias
    for tv_key, key in enc.key_map.items():
        assert torch.equal(own[key], ref[tv_key]), tv_key
    fresh = build_encoder("resnet18")
    assert not torch.equal(fresh.state_dict()["stem.conv1.weight"], own["stem.conv1.weight"])

    # encoders.pt-style state loads back into a fresh encoder
    fresh.load_state_dict(enc.state_dict())

    old_style = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, tmp_path / "old.pth")  # as saved before BN counted batches
    old = build_encoder("resnet18", tmp_path / "old.pth")
    assert torch.equal(old.state_dict()["stem.conv1.weight"], ref["conv1.weight"])

    extra = dict(ref, **{"layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \[layer5\.0\.conv1\.weight\]"):
        build_encoder("resnet18", tmp_path / "extra.pth")

    broken = dict(ref)
    del broken["layer4.1.bn2.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \[layer4\.1\.bn2\.weight\]"):
        build_encoder("resnet18", tmp_path / "broken.pth")

    effnet = tmp_path / "effnet.pth"
    torch.save(tvm.efficientnet_b0(weights=None).state_dict(), effnet)
    with pytest.raises(ValueError, match="features"):
        build_encoder("resnet18", effnet)
    assert n_params(build_encoder("efficientnet_b0", effnet)) > 0  # its own file fits


# ---------------------------------------------------------------- heads and loss


def test_heads_shapes() -> None:
    from dsf.models import Predictor, Projector

    proj, pred = Projector(64), Predictor(64)
    assert n_params(proj) == 3 * 64 * 64 + 4 * 64
    assert n_params(pred) == 64 * 16 + 2 * 16 + 16 * 64 + 64
    assert not proj[-1].affine
    z = proj(torch.randn(4, 64))
    assert pred(z).shape == (4, 64)


def test_simsiam_loss_by_hand_and_stop_gradient() -> None:
    p1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0], [0.0, -1.0]], requires_grad=True)
    p2 = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    z1 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    # rows: cos(p1, z2) = 1/sqrt(2), -1; cos(p2, z1) = 1, 0
    d12 = -(1 / math.sqrt(2) - 1) / 2
    d21 = -(1 + 0) / 2
    assert negative_cosine(p1, z2).item() == pytest.approx(d12, abs=1e-6)
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(0.5 * (d12 + d21), abs=1e-6)
    assert loss.item() == pytest.approx(-1 / (4 * math.sqrt(2)), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None


def _both_ways(head: nn.Module, x: Tensor, weights: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Output of a head and the gradients of a weighted sum of it, for x of shape (R, 2, d)."""
    head.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = head(x)
    (out * weights).sum().backward()
    grads = [x.grad, *(p.grad for p in head.parameters())]
    assert all(g is not None for g in grads)
    return out.detach(), [g.clone() for g in grads]


@pytest.mark.parametrize("kind", ["projector", "predictor"])
@pytest.mark.parametrize("sync", [False, True], ids=["batchnorm", "syncbatchnorm"])
def test_paired_heads_equal_separate_views(kind: str, sync: bool) -> None:
    """Both views in one call, (R, 2, d), give each view's own forward and the same gradients:
    batch-norm statistics stay per view (SyncBatchNorm, under DDP, takes the views in turn).
    On the test device (cuda in bench/gpu.sh)."""
    from dsf.models import Predictor, Projector

    torch.manual_seed(0)
    head = (Projector if kind == "projector" else Predictor)(12).double().to(DEVICE)
    if sync:  # without a process group SyncBatchNorm normalises like BatchNorm
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in head.modules())
    x = torch.randn(5, 2, 12, dtype=torch.float64, device=DEVICE)
    x[:, 1] = 3 * x[:, 1] + 2  # the views' statistics differ: one shared BN would be wrong
    weights = torch.randn(5, 2, 12, dtype=torch.float64, device=DEVICE)
    paired, paired_grads = _both_ways(head, x, weights)

    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, x: Tensor) -> Tensor:
            return torch.stack([self.head(x[:, v]) for v in range(2)], dim=1)

    separate, separate_grads = _both_ways(Separate(), x, weights)
    assert len(separate_grads) == len(paired_grads) > 3
    torch.testing.assert_close(paired, separate, rtol=1e-12, atol=1e-12)
    for a, b in zip(paired_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    shared = head(x.reshape(10, 12)).reshape(5, 2, 12)  # one BN over both views: not the same
    assert not torch.allclose(paired, shared, atol=1e-3)


def test_paired_loss_and_old_checkpoints() -> None:
    from dsf.models import Projector
    from dsf.models.heads import paired_simsiam_loss

    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 2, 8, generator=g, requires_grad=True)
    z = torch.randn(6, 2, 8, generator=g, requires_grad=True)
    loss = paired_simsiam_loss(p, z)
    assert loss.item() == pytest.approx(simsiam_loss(p[:, 0], p[:, 1], z[:, 0], z[:, 1]).item())
    loss.backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rows, 2, d"):
        paired_simsiam_loss(p[:, :1], z[:, :1])
    # heads' batch norms keep no running statistics (never evaluated); older checkpoints had them
    head = Projector(8)
    assert not any(k.endswith(("running_mean", "running_var")) for k in head.state_dict())
    old = nn.Sequential(
        nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8, affine=False),
    )  # fmt: skip
    head.load_state_dict(old.state_dict())
    assert torch.equal(head[0].weight, old[0].weight)


# ---------------------------------------------------------------- the model


def test_default_model_sizes(model: DSFModel) -> None:
    assert n_params(model) == 123_551_584
    assert n_params(model.context_encoder) == n_params(model.target_encoder) == 11_176_512
    assert n_params(model.projectors) + n_params(model.predictors) == 101_198_560
    assert model.context_encoder is not model.target_encoder
    assert model.n_keep == 8
    expected = {}
    for s, c in enumerate(RESNET18_DIMS, start=1):
        expected |= {f"context{s}": c, f"target{s}": c, f"fusion{s}": 9 * c}
    assert model.head_dims == expected
    assert [model.head_dims[f"fusion{s}"] for s in range(1, 5)] == [576, 1152, 2304, 4608]
    for key, d in expected.items():
        assert model.projectors[key][0].in_features == d
        assert model.predictors[key][0].in_features == d
        assert model.predictors[key][-1].out_features == d
    state = model.encoder_state()
    assert state["backbone"] == "resnet18" and tuple(state["dims"]) == RESNET18_DIMS
    assert state["context"].keys() == state["target"].keys()


def test_head_inputs_per_group(model: DSFModel) -> None:
    """Rows and widths the heads see, both views in one call: context (B, 2, C), target
    (B*N, 2, C), fusion (B, 2, 9C)."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = [
        model.projectors[k].register_forward_pre_hook(
            lambda _m, args, k=k: seen.setdefault(k, []).append(tuple(args[0].shape))
        )
        for k in model.head_dims
    ]
    try:
        context, targets = views()
        with torch.no_grad():
            model(context, targets, model.draw_perms(B, torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    for s, c in enumerate(RESNET18_DIMS, start=1):
        assert seen[f"context{s}"] == [(B, 2, c)]
        assert seen[f"target{s}"] == [(B * N, 2, c)]
        assert seen[f"fusion{s}"] == [(B, 2, 9 * c)]


def test_loss_symmetric_in_views(model: DSFModel) -> None:
    context, targets = views()
    perms = model.draw_perms(B, torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(context, targets, perms)
        b = model(context.flip(0), targets.flip(0), perms.flip(0))
    for key in ("loss", *GROUPS, "fusion_s1", "target_s4", "z_std"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-5), key
    assert -6.6 <= a["loss"].item() <= 6.6


def test_stop_gradient_in_model(model: DSFModel, swap: Swap) -> None:
    """With predictors that ignore z, z reaches the loss only through stopgrad: nothing upstream
    of the predictors (projectors, encoders) may receive a gradient."""

    class Constant(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(d))

        def forward(self, z: Tensor) -> Tensor:
            return self.p.expand(*z.shape[:-1], -1)

    constants = nn.ModuleDict({key: Constant(d) for key, d in model.head_dims.items()})
    swap(model, "predictors", constants)
    model.zero_grad(set_to_none=True)
    context, targets = views()
    out = model(context, targets, model.draw_perms(B, torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert all(model.predictors[k].p.grad is not None for k in model.head_dims)
    upstream = [model.projectors, model.context_encoder, model.target_encoder]
    assert all(p.grad is None for m in upstream for p in m.parameters())
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def reference_losses(
    ctx_enc: nn.Module, tgt_enc: nn.Module, context: Tensor, blocks: Tensor, perms: Tensor
) -> dict[str, list[float]]:
    """Eq. 3-6 with identity heads (p = z = q), one image and one block at a time."""

    def cos(a: Tensor, b: Tensor) -> float:
        return float((a @ b) / (a.norm() * b.norm()))

    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    for s in range(4):
        ctx = [[ctx_enc(context[v, b][None])[s][0] for b in range(B)] for v in range(2)]
        blk = [[[tgt_enc(blocks[v, b, k][None])[s][0] for k in range(N)] for b in range(B)]
               for v in range(2)]  # fmt: skip
        fused = [
            [torch.cat([ctx[v][b], *(blk[v][b][k] for k in perms[v, b, :8].tolist())])
             for b in range(B)]
            for v in range(2)
        ]  # fmt: skip
        out["context"].append(-sum(cos(ctx[0][b], ctx[1][b]) for b in range(B)) / B)
        pairs = [(blk[0][b][k], blk[1][b][k]) for b in range(B) for k in range(N)]
        out["target"].append(-sum(cos(a, b) for a, b in pairs) / (B * N))
        out["fusion"].append(-sum(cos(fused[0][b], fused[1][b]) for b in range(B)) / B)
    return out


def test_loss_equals_formula(model: DSFModel, swap: Swap) -> None:
    """Identity heads, known encoders: the total equals Eq. 3-8 recomputed here block by block."""
    identity_heads(model, swap)
    ctx_enc, tgt_enc = MixEncoder(RESNET18_DIMS, 1), MixEncoder(RESNET18_DIMS, 2)
    swap(model, "context_encoder", ctx_enc)
    swap(model, "target_encoder", tgt_enc)
    g = torch.Generator().manual_seed(5)
    context = torch.randn(2, B, 3, 8, 8, generator=g)
    blocks = torch.randn(2, B, N, 3, 8, 8, generator=g)  # raster order, per view
    perms = model.draw_perms(B, g)
    targets = torch.stack(
        [torch.stack([blocks[v, b, perms[v, b]] for b in range(B)]) for v in range(2)]
    )
    with torch.no_grad():
        out = model(context, targets, perms)
    ref = reference_losses(ctx_enc, tgt_enc, context, blocks, perms)
    for group in GROUPS:
        for s in range(4):
            assert out[f"{group}_s{s + 1}"].item() == pytest.approx(ref[group][s], abs=1e-5)
        weighted = sum(w * v for w, v in zip(WEIGHTS, ref[group], strict=True))
        assert out[group].item() == pytest.approx(weighted, abs=1e-5)
    total = sum(w * v for g in GROUPS for w, v in zip(WEIGHTS, ref[g], strict=True))
    assert out["loss"].item() == pytest.approx(total, abs=1e-5)
    assert abs(total) > 0.05  # a real check: far from 0 and from -6.6


def test_loss_minimum_is_minus_6_6(model: DSFModel, swap: Swap) -> None:
    """Identity heads, identical views: every p points along its z, so the loss is -sum(w) * 3."""
    identity_heads(model, swap)
    context, targets = views()
    perms = model.draw_perms(B, torch.Generator().manual_seed(0))
    same = (context[:1].expand(2, -1, -1, -1, -1), targets[:1].expand(2, -1, -1, -1, -1, -1))
    with torch.no_grad():
        out = model(*same, perms[:1].expand(2, -1, -1))
    assert out["loss"].item() == pytest.approx(-6.6, abs=1e-4)
    for group in GROUPS:
        assert out[group].item() == pytest.approx(-2.2, abs=1e-4)


def test_targets_align_by_block_with_real_encoder(model: DSFModel, swap: Swap) -> None:
    """Same blocks, different slot orders per view: after the inverse permutation the real
    target encoder's vectors coincide block by block (target loss -2.2); the fusion differs."""
    identity_heads(model, swap)
    _, targets = views()
    blocks = targets[0]
    perms = model.draw_perms(B, torch.Generator().manual_seed(11))
    assert not torch.equal(perms[0], perms[1])
    shuffled = torch.stack(
        [torch.stack([blocks[b, perms[v, b]] for b in range(B)]) for v in range(2)]
    )
    context = torch.randn(1, B, 3, PX, PX).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        out = model(context, shuffled, perms)
    assert out["target"].item() == pytest.approx(-2.2, abs=1e-4)
    assert out["context"].item() == pytest.approx(-2.2, abs=1e-4)
    assert out["fusion"].item() > -2.2 + 1e-3


def test_jigsaw_and_fusion_slots(model: DSFModel, swap: Swap) -> None:
    """An encoder whose output names the block: target rows are in raster order in both views,
    and the fusion holds the context then exactly the blocks of the first n_keep slots in order."""
    identity_heads(model, swap)
    swap(model, "context_encoder", MeanEncoder(RESNET18_DIMS))
    swap(model, "target_encoder", MeanEncoder(RESNET18_DIMS))
    perms = model.draw_perms(B, torch.Generator().manual_seed(2))
    ids = torch.arange(B * N, dtype=torch.float32).reshape(B, N)  # block k of sample b: b*N + k
    slot_ids = torch.stack([torch.stack([ids[b, perms[v, b]] for b in range(B)]) for v in range(2)])
    targets = slot_ids[..., None, None, None].expand(2, B, N, 3, 4, 4)
    ctx_ids = 1000.0 + torch.arange(B, dtype=torch.float32)
    context = ctx_ids[None, :, None, None, None].expand(2, B, 3, 4, 4)
    seen: dict[str, list[Tensor]] = {}
    hooks = [
        model.projectors[k].register_forward_pre_hook(
            lambda _m, args, k=k: seen.setdefault(k, []).append(args[0].detach().clone())
        )
        for k in ("target4", "fusion2")
    ]
    try:
        with torch.no_grad():
            model(context, targets, perms)
    finally:
        for h in hooks:
            h.remove()
    for v in range(2):
        raster = seen["target4"][0][:, v].reshape(B, N, 512)
        assert torch.equal(raster, ids[..., None].expand(-1, -1, 512))
        fusion = seen["fusion2"][0][:, v].reshape(B, 9, 128)
        assert torch.equal(fusion[:, 0], ctx_ids[:, None].expand(-1, 128))
        kept = torch.stack([ids[b, perms[v, b, :8]] for b in range(B)])
        assert torch.equal(fusion[:, 1:], kept[..., None].expand(-1, -1, 128))


def test_channels_last_inputs(model: DSFModel) -> None:
    context, targets = views()
    perms = model.draw_perms(B, torch.Generator().manual_seed(0))
    nhwc_c = context.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    nhwc_t = targets.permute(0, 1, 2, 4, 5, 3).contiguous().permute(0, 1, 2, 5, 3, 4)
    model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            a = model(context, targets, perms)["loss"]
            b = model(nhwc_c, nhwc_t, perms)["loss"]
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


# ---------------------------------------------------------------- variants

VARIANTS = {
    # method: (groups, stages, n_keep)
    "dsf": (GROUPS, (1, 2, 3, 4), 8),
    "simsiam": (("context", "target"), (4,), None),
    "dsl_only": (("context", "target"), (1, 2, 3, 4), None),
    # Table V's "w/o DSL" rows: "Ours" without DSL's density, every group at the last stage
    "ctfm_only": (GROUPS, (4,), 8),
    "jigsaw_only": (GROUPS, (4,), 16),
    "mask_only": (GROUPS, (4,), 8),
}


@pytest.mark.parametrize("method", list(VARIANTS))
def test_draw_perms(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    perms = draw_perms(64, N, method, g)
    assert perms.shape == (2, 64, N) and perms.dtype == torch.long
    assert torch.equal(perms.sort(dim=-1).values, torch.arange(N).expand(2, 64, N))
    identity = torch.arange(N).expand(2, 64, N)
    if method in ("simsiam", "dsl_only"):
        assert torch.equal(perms, identity)
    elif method == "mask_only":
        for part in (perms[..., :8], perms[..., 8:]):
            assert torch.equal(part, part.sort(dim=-1).values)  # raster order within each part
        assert not torch.equal(perms[..., :8], identity[..., :8])  # a random subset is kept
        assert not torch.equal(perms[0], perms[1])
    else:
        assert not torch.equal(perms[0], perms[1])  # fresh per view
        assert not torch.equal(perms[:, 0], perms[:, 1])  # and per sample
        assert (perms[..., :-1] > perms[..., 1:]).any()  # shuffled


def test_keep_counts() -> None:
    assert keep_count(16, 0.5, "dsf") == keep_count(16, 0.5, "ctfm_only") == 8
    assert keep_count(16, 0.5, "mask_only") == 8
    assert keep_count(16, 0.5, "jigsaw_only") == 16
    assert keep_count(16, 0.75, "dsf") == 4
    assert keep_count(4, 0.5, "dsf") == 2
    assert keep_count(16, 0.7, "dsf") == 5 and keep_count(16, 0.45, "dsf") == 9  # rounded
    # the workflow's torch-free list of the methods that read mask_ratio is the model's
    from dsf.inits import MASKING_METHODS

    assert set(MASKING_METHODS) == {m for m, v in dsf_module.METHODS.items() if v.mask}


@pytest.mark.parametrize("method", ["simsiam", "dsl_only", "ctfm_only", "jigsaw_only", "mask_only"])
def test_variants_switch_off_what_they_name(method: str) -> None:
    """At scale 2 (4 blocks), which keeps the fusion heads small; dsf is the module fixture."""
    groups, stages, _ = VARIANTS[method]
    n_blocks = 4
    model = DSFModel(n_blocks=n_blocks, method=method)
    keys = {f"{g}{s}" for g in groups for s in stages}
    assert set(model.projectors) == set(model.predictors) == keys
    if "fusion" in groups:
        assert model.n_keep == (4 if method == "jigsaw_only" else 2)
        assert model.head_dims["fusion4"] == (model.n_keep + 1) * 512
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, B, 3, PX, PX, generator=g)
    targets = torch.randn(2, B, n_blocks, 3, PX, PX, generator=g)
    out = model(context, targets, model.draw_perms(B, g))
    weights = (0.1, 0.4, 0.7, 1.0)  # Eq. 7; a single-stage variant's stage 4 weighs 1.0
    for group in GROUPS:
        if group in groups:
            assert out[group].item() != 0.0
            expected = sum(weights[st - 1] * out[f"{group}_s{st}"].item() for st in stages)
            assert out[group].item() == pytest.approx(expected, rel=1e-5)
        else:
            assert out[group].item() == 0.0 and not out[group].requires_grad
    unused = {f"{g}_s{s}" for g in GROUPS for s in range(1, 5)} - {
        f"{g}_s{s}" for g in groups for s in stages
    }
    assert not unused & set(out)
    assert {f"z_std_{g}" for g in groups} <= set(out)
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_the_collapse_monitor_is_the_std_over_rows_of_normalised_vectors() -> None:
    """SimSiam's z_std: 0 when every row is one vector (collapse), about 1/sqrt(d) for
    random directions; the mean over channels and views of the std over rows."""
    from dsf.models.dsf import _normalised_std

    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 2, 256, generator=g).expand(64, 2, 256)
    assert _normalised_std(same).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.randn(4096, 2, 256, generator=g)
    assert _normalised_std(spread).item() == pytest.approx(256**-0.5, rel=0.03)
    scaled = spread * torch.rand(4096, 2, 1, generator=g).add(0.5)  # lengths do not count
    assert _normalised_std(scaled).item() == pytest.approx(_normalised_std(spread).item())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        DSFModel(method="nope")
    with pytest.raises(ValueError, match="backbone"):
        build_encoder("vgg16")
    with pytest.raises(ValueError, match="mask_ratio"):
        DSFModel(mask_ratio=1.0)


# ---------------------------------------------------------------- training step


def test_one_optimisation_step(model: DSFModel) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # Adam's 1 GB of state buys no check here
    context, targets = views()
    out = model(context, targets, model.draw_perms(B, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out["loss"]) and -6.6 <= out["loss"].item() <= 6.6
    assert 0 < out["z_std"].item() < 1
    out["loss"].backward()
    for name, p in model.named_parameters():  # both encoders and every head of dsf are used
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = model.target_encoder.stages[3][0][0].conv1.weight.clone()
    opt.step()
    assert not torch.equal(before, model.target_encoder.stages[3][0][0].conv1.weight)
    model.zero_grad(set_to_none=True)
