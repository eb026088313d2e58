import pytest
import torch
from torch import nn

from src.config import ModelParams
from src.learn.model import ModelError, Probabilities, build_model, dihedral_views

TINY = ModelParams(name="test_vit", pretrained=False, dropout=0.3, drop_path=0.2)


def test_classifier_takes_uint8_images_and_returns_seven_logits():
    model = build_model(TINY, 32).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert model(images).shape == (3, 7)
    probs = Probabilities(model)(images)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)


def test_dropout_and_drop_path_reach_the_model():
    model = build_model(TINY, 32)
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    drop_paths = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert 0.3 in dropouts
    assert drop_paths and max(drop_paths) == pytest.approx(0.2)


def test_patch_size_override():
    model = build_model(TINY.model_copy(update={"patch_size": 8}), 32)
    assert model.backbone.patch_embed.num_patches == 16


def tokens_into_the_first_block(model: nn.Module, images: torch.Tensor) -> int:
    seen = []
    hook = model.backbone.blocks[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    model(images)
    hook.remove()
    return seen[0]


def test_patch_drop_thins_the_tokens_in_training_only():
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    model = build_model(TINY.model_copy(update={"patch_drop": 0.5}), 64)  # 4x4 patches of 16 px + class token
    assert tokens_into_the_first_block(model.train(), images) == 1 + 8
    assert tokens_into_the_first_block(model.eval(), images) == 1 + 16


def test_patch_drop_on_a_model_without_patches_is_a_clear_error():
    with pytest.raises(ModelError, match="model.patch_drop"):
        build_model(TINY.model_copy(update={"name": "test_resnet", "patch_drop": 0.5}), 64)


def test_conv_stem_keeps_the_token_grid_and_learns():
    patchify = build_model(TINY, 32)
    model = build_model(TINY.model_copy(update={"stem": "conv"}), 32)
    embed = model.backbone.patch_embed
    assert embed.grid_size == patchify.backbone.patch_embed.grid_size
    convs = [m for m in embed.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 and convs[0].kernel_size == (3, 3)  # 16 = 2**4
    model(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)).sum().backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ModelError, match="power of 2"):
        build_model(TINY.model_copy(update={"stem": "conv", "patch_size": 6}), 36)


def test_unknown_model_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model(TINY.model_copy(update={"name": "not_a_model"}), 32)
    with pytest.raises(ModelError, match="model.weights"):
        build_model(TINY.model_copy(update={"weights": tmp_path / "missing.safetensors"}), 32)


def test_unfetchable_pretrained_weights_name_both_options(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1, as an air-gapped site sets it (read at import, hence the attribute); empty cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        build_model(ModelParams(name="test_vit", pretrained=True), 32)
    assert "model.weights" in str(err.value) and "model.pretrained: false" in str(err.value)


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_vit", pretrained=False, num_classes=7, img_size=32)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(TINY.model_copy(update={"weights": path}), 32)
    assert torch.equal(model.backbone.pos_embed, source.pos_embed)


def test_weights_made_at_224_px_load_at_another_size_with_resampled_position_embeddings(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_vit", pretrained=False, num_classes=1000, img_size=64)  # an ImageNet head
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(TINY.model_copy(update={"weights": path}), 32)
    assert model.backbone.pos_embed.shape[1] < source.pos_embed.shape[1]  # fewer patches at 32 px
    assert torch.equal(model.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert model.backbone.head.out_features == 7  # the 1000-class head is dropped, a 7-class head made
    assert model(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)).shape == (2, 7)


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_frozen_early_blocks_do_not_move_and_get_no_gradient(layer_decay):
    from src.config import TrainParams
    from src.learn.engine import make_optimizer
    from src.learn.model import freeze_early

    torch.manual_seed(0)
    model = build_model(TINY.model_copy(update={"dropout": 0.0, "drop_path": 0.0}), 32)
    freeze_early(model, 2)
    vit = model.backbone
    frozen = [vit.patch_embed, vit.blocks[0], vit.blocks[1]]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train = TrainParams(lr=1e-2, layer_decay=layer_decay)
    optimizer = make_optimizer(model, train, torch.device("cpu"))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()

    for name, p in model.named_parameters():
        is_frozen = any(p is q for m in frozen for q in m.parameters()) or name.endswith(("cls_token", "pos_embed"))
        assert p.requires_grad != is_frozen and (id(p) in in_optimizer) != is_frozen, name
        assert (p.grad is None) == is_frozen, name
        assert torch.equal(p, before[name]) == is_frozen, name  # frozen stay put; every other weight moved


def test_freezing_more_blocks_than_there_are_or_a_non_vit_is_a_clear_error():
    from src.learn.model import freeze_early

    with pytest.raises(ModelError, match="train.freeze_blocks: 7 is more than the model's 6 blocks"):
        freeze_early(build_model(TINY, 32), 7)
    resnet = build_model(ModelParams(name="resnet10t", pretrained=False), 32)
    with pytest.raises(ModelError, match="train.freeze_blocks: ResNet is not a ViT"):
        freeze_early(resnet, 1)
    freeze_early(resnet, 0)  # nothing asked, nothing checked


def test_each_prefix_of_the_tta_views_is_a_symmetric_set():
    """The first 2 and the first 4 views are closed under composition, and all 8 are the 8 symmetries of a square."""
    images = torch.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
    key = lambda t: tuple(t.flatten().tolist())  # noqa: E731
    rotations = [torch.rot90(images, k, dims=(1, 2)) for k in range(4)]
    assert {key(v) for v in dihedral_views(images)} == {key(v) for v in rotations + [r.flip(2) for r in rotations]}
    for count in (2, 4):
        views = {key(v) for v in dihedral_views(images, count)}
        assert len(views) == count
        assert all(key(w) in views for v in dihedral_views(images, count) for w in dihedral_views(v, count))


def test_tta_over_fewer_views_averages_just_those():
    torch.manual_seed(0)
    classifier = build_model(ModelParams(name="vit_tiny_patch16_224", pretrained=False, patch_size=8), 32).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        two = Probabilities(classifier, tta=True, views=2)(images)
        expected = torch.stack([classifier(v).softmax(-1) for v in (images, images.flip(2))]).mean(0)
        assert Probabilities(classifier, tta=False, views=4).views == 1
    torch.testing.assert_close(two, expected, atol=1e-6, rtol=1e-5)


def test_any_size_lets_a_vit_take_smaller_inputs_with_its_parameters_at_the_built_size():
    params = ModelParams(name="vit_tiny_patch16_224", pretrained=False)
    fixed, model = build_model(params, 64), build_model(params, 64, any_size=True)
    assert not fixed.backbone.dynamic_img_size and model.backbone.dynamic_img_size
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fixed.state_dict().items()}
    assert model(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)).shape == (2, 7)
    conv = build_model(TINY.model_copy(update={"stem": "conv"}), 32, any_size=True)
    assert conv(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)).shape == (2, 7)


def test_any_size_on_a_model_that_cannot_take_it_is_a_clear_error():
    with pytest.raises(ModelError, match="train.progressive_size"):
        build_model(TINY.model_copy(update={"name": "test_resnet"}), 64, any_size=True)
