"""The ViT: weight-for-weight timm, parameter counts, FLOPs, gradient checkpointing, position-embedding resize."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models.specs import SPECS, TIMM_NAMES, ViTArgs, get_spec, spec_of_shape
from pretrain.models.vit import create_vit, param_shapes, resize_pos_embed, resolve_args, train_flops_per_image
from tests.helpers.saved_bytes import saved_for_backward_bytes

timm = pytest.importorskip("timm")

# Real variants at full shape where the CPU allows; ViT-L and ViT-H at reduced depth (shapes checked by count below).
DEPTH = {"vit_large_patch16": 2, "vit_huge_patch14": 2}


@pytest.mark.parametrize("name", list(TIMM_NAMES))
@pytest.mark.parametrize("pool", ["token", "gap"])
def test_state_dict_round_trips_with_timm(name, pool):
    torch.manual_seed(0)
    depth = DEPTH.get(name)
    ours = create_vit(name, num_classes=7, pool=pool, depth=depth).eval()
    for p in ours.parameters():  # random weights everywhere, head included (its init is zero)
        p.data.normal_(0, 0.02)
    kw = {"depth": depth} if depth else {}
    theirs = timm.create_model(TIMM_NAMES[name], num_classes=7, global_pool="avg" if pool == "gap" else "token", **kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() <= 1e-4
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4
    # and back: timm's weights load into ours
    back = create_vit(name, num_classes=7, pool=pool, depth=depth)
    back.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize(
    "name,millions", [("vit_base_patch16", 86.6), ("vit_large_patch16", 304.3), ("vit_huge_patch14", 632.0)]
)
def test_parameter_counts_of_real_shapes(name, millions):
    with torch.device("meta"):
        m = create_vit(name, num_classes=1000)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.01, n


@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"])
def test_train_flops_match_torch_flop_counter(name):
    args = resolve_args(name, num_classes=21843)
    with torch.device("meta"):
        m = create_vit(name, num_classes=21843)
        x = torch.randn(2, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
    measured = counter.get_total_flops() / 2
    assert abs(train_flops_per_image(args) - measured) / measured < 0.02


def _loss_and_grads(model, x, y):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_grad_checkpointing_same_loss_and_grads(every):
    torch.manual_seed(0)
    model = create_vit("vit_test_patch4", num_classes=10, drop_rate=0.1, drop_path_rate=0.1).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    loss_a, grads_a = _loss_and_grads(model, x, y)
    model.set_grad_checkpointing(True, every=every)
    torch.manual_seed(1)  # dropout masks must be replayed identically in the recomputation
    loss_b, grads_b = _loss_and_grads(model, x, y)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for n in grads_a:
        assert (grads_a[n] - grads_b[n]).abs().max() <= 1e-5, n


def _saved_activation_bytes(model: torch.nn.Module, every: int) -> int:
    """Bytes autograd saves for backward in one forward; checkpointed blocks are not seen by the hooks, so their
    inputs (which the checkpoint keeps for the recomputation) are added: one (B, N, D) tensor per checkpointed block."""
    model.set_grad_checkpointing(every > 0, every=max(every, 1))
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    a = model.args
    tokens = 1 + (a.img_size // a.patch_size) ** 2
    kept_inputs = (a.depth // every if every else 0) * x.shape[0] * tokens * a.embed_dim * x.element_size()
    return saved_for_backward_bytes(model, x) + kept_inputs


def test_grad_checkpointing_lowers_saved_activations():
    """Deterministic: what autograd keeps for backward, not a process's resident memory."""
    torch.manual_seed(0)
    model = create_vit("vit_test_patch4", num_classes=10)
    off, every2, every1 = (_saved_activation_bytes(model, k) for k in (0, 2, 1))
    assert every1 < every2 < off, (off, every2, every1)
    assert every1 < 0.25 * off, (off, every1)  # measured: 0.16 of `off` (4 blocks, 8 images of 65 tokens)


def test_resize_pos_embed_matches_timm_and_keeps_class_token():
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32)
    ours = resize_pos_embed(pe, 24)
    assert ours.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(ours[:, :1], pe[:, :1])
    torch.testing.assert_close(ours, resample_abs_pos_embed(pe, [24, 24], num_prefix_tokens=1))
    assert resize_pos_embed(pe, 14) is pe


def test_head_bias_init_and_no_weight_decay():
    m = create_vit("vit_test_patch4", num_classes=5, head_bias_init=-10.0)
    assert torch.all(m.head.bias == -10.0) and torch.all(m.head.weight == 0)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_pre_logits_layer_and_image_size_override():
    m = create_vit("vit_test_patch4", num_classes=5, representation_size=48, img_size=48)
    assert m.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert m.pre_logits.fc.weight.shape == (48, 64)
    assert m(torch.randn(2, 3, 48, 48)).shape == (2, 5)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown model 'vit_gigantic'; choose one of .*vit_base_patch16"):
        create_vit("vit_gigantic")


@pytest.mark.parametrize(
    "args",
    [
        ViTArgs(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=5),
        ViTArgs(img_size=48, patch_size=4, embed_dim=64, depth=1, num_heads=4, num_classes=0, pool="gap"),
        ViTArgs(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, representation_size=24),
    ],
    ids=["token", "gap-headless", "pre-logits"],
)
def test_param_shapes_equal_the_models_state_dict(args):
    """The export checks checkpoints against `param_shapes` without building the model: it must stay in step."""
    with torch.device("meta"):
        sd = create_vit("vit_test_patch4", **vars(args)).state_dict()
    assert list(param_shapes(args).items()) == [(k, tuple(v.shape)) for k, v in sd.items()]


def test_each_variant_is_declared_once_and_found_by_shape():
    assert set(TIMM_NAMES) == {n for n, s in SPECS.items() if s.timm} and "vit_test_patch4" not in TIMM_NAMES
    for name, spec in SPECS.items():
        assert get_spec(name) is spec and spec.name == name
        assert spec_of_shape(resolve_args(name, img_size=384, num_classes=3, pool="gap")) is spec
    assert spec_of_shape(resolve_args("vit_base_patch16", depth=6)) is None
