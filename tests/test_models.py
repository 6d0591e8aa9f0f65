"""Backbones, checkpoint formats and the scalar head (entk_ray.models)."""
from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict

import fsspec
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from entk_ray import models as M
from entk_ray.config import ConfigError, ModelConfig


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bundled_state_dict():
    return torch.load(str(M.bundled_lite0_weights_path()), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0():
    return M.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def images32():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source_resnet18():
    """A torchvision ResNet-18 with random weights AND random BatchNorm statistics (eval mode)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = torchvision.models.resnet18(weights=None)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def source_embeddings(source_resnet18, images32):
    body = torchvision.models.resnet18(weights=None)
    body.load_state_dict(source_resnet18.state_dict())
    body.fc = torch.nn.Identity()
    with torch.no_grad():
        return body.eval()(images32)


@pytest.fixture(scope="module")
def torchvision_ckpt(source_resnet18, tmp_path_factory):
    """A plain torchvision state_dict file, classifier ``fc.*`` included (~45 MB)."""
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_torchvision.pth"
    torch.save(source_resnet18.state_dict(), path)
    return path


def _embed(backbone, images):
    with torch.no_grad():
        return backbone(images)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_lite0_mapping_pairs_every_key_and_drops_only_the_classifier(bundled_state_dict):
    assert len(bundled_state_dict) == 296
    target = M.create_lite0_backbone()
    mapped = M.map_lukemelas_to_timm_lite0(bundled_state_dict, target)
    assert list(mapped) == list(target.state_dict())  # all 294 timm keys, in order
    assert len(mapped) == 294
    source_keys = [k for k in bundled_state_dict if k not in ("_fc.weight", "_fc.bias")]
    assert len(source_keys) == 294
    for src, dst in zip(source_keys, mapped):
        assert mapped[dst] is bundled_state_dict[src]
    assert mapped["conv_stem.weight"] is bundled_state_dict["_conv_stem.weight"]
    assert mapped["bn2.running_var"] is bundled_state_dict["_bn1.running_var"]
    assert mapped["blocks.6.0.conv_pwl.weight"] is bundled_state_dict["_blocks.15._project_conv.weight"]


def test_lite0_loads_bundled_weights_strictly(lite0, bundled_state_dict):
    assert not lite0.training
    assert lite0.num_features == 1280
    loaded = lite0.state_dict()
    mapped = M.map_lukemelas_to_timm_lite0(bundled_state_dict, M.create_lite0_backbone())
    assert set(loaded) == set(mapped)
    for key, tensor in mapped.items():
        assert torch.equal(loaded[key], tensor), key
    assert all(p.requires_grad for p in lite0.parameters())


def test_lite0_mapping_rejects_a_wrong_shape_and_names_the_key(bundled_state_dict):
    broken = OrderedDict(bundled_state_dict)
    broken["_blocks.5._depthwise_conv.weight"] = torch.zeros(240, 1, 5, 5)
    with pytest.raises(M.CheckpointError, match=r"_blocks\.5\._depthwise_conv\.weight.*blocks\.3\.0\.conv_dw\.weight"):
        M.map_lukemelas_to_timm_lite0(broken, M.create_lite0_backbone())


def test_lite0_mapping_rejects_shifted_keys(bundled_state_dict):
    """Dropping one key shifts all later pairs: the count check names the unpaired keys."""
    broken = OrderedDict((k, v) for k, v in bundled_state_dict.items() if k != "_blocks.2._bn0.bias")
    with pytest.raises(M.CheckpointError, match=r"293 lukemelas-style keys.*294 keys.*bn2\.num_batches_tracked.*first mismatched pair: _blocks\.2\._bn0\.running_mean"):
        M.map_lukemelas_to_timm_lite0(broken, M.create_lite0_backbone())


def test_lite0_mapping_checks_roles_not_only_shapes(bundled_state_dict):
    """Swapping running_mean and running_var keeps shapes but breaks the leaf-name check."""
    items = list(bundled_state_dict.items())
    i = [k for k, _ in items].index("_bn0.running_mean")
    items[i], items[i + 1] = items[i + 1], items[i]
    with pytest.raises(M.CheckpointError, match=r"_bn0\.running_var.*bn1\.running_mean"):
        M.map_lukemelas_to_timm_lite0(OrderedDict(items), M.create_lite0_backbone())


def test_lite0_saved_and_reloaded_predicts_identically(lite0, images32, tmp_path, bundled_state_dict):
    timm_path = tmp_path / "lite0_timm.pth"
    torch.save(lite0.state_dict(), timm_path)
    lukemelas_path = tmp_path / "lite0_lukemelas.pth"
    torch.save(bundled_state_dict, lukemelas_path)
    expected = _embed(lite0, images32)
    for path, fmt in ((timm_path, "auto"), (timm_path, "timm"), (lukemelas_path, "auto")):
        reloaded = M.load_efficientnet_lite0(path, checkpoint_format=fmt)
        assert torch.equal(_embed(reloaded, images32), expected), (path, fmt)


def test_lite0_timm_checkpoint_with_missing_key_is_named(lite0, tmp_path):
    state = lite0.state_dict()
    del state["blocks.2.1.bn2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(M.CheckpointError, match=r"missing keys: \[blocks\.2\.1\.bn2\.weight\]"):
        M.load_efficientnet_lite0(path)


def test_lite0_rejects_resnet_formats():
    with pytest.raises(ConfigError, match="model.checkpoint_format"):
        M.load_efficientnet_lite0(checkpoint_format="moco")


def test_lite0_outputs_are_finite_and_input_dependent(lite0, images32):
    features = _embed(lite0, images32)
    assert features.shape == (3, 1280)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    assert (features >= 0).all()  # ReLU6 before global average pooling


def test_bundled_lite0_classifies_sklearn_sample_images(bundled_state_dict):
    """With its ImageNet classifier the mapped model recognizes a daisy and a palace.

    scikit-learn bundles two photos: ``flower.jpg`` (a daisy, ImageNet class 985) and ``china.jpg``
    (a Chinese palace: 698 palace, 663 monastery, 442 bell cote). A wrong key pairing gives noise.
    """
    from sklearn.datasets import load_sample_images

    full = timm.create_model(M.LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    mapped = M.map_lukemelas_to_timm_lite0(bundled_state_dict, M.create_lite0_backbone())
    mapped["classifier.weight"] = bundled_state_dict["_fc.weight"]
    mapped["classifier.bias"] = bundled_state_dict["_fc.bias"]
    full.load_state_dict(mapped, strict=True)
    full.eval()
    mean, std = M.normalization("efficientnet_lite0")
    samples = load_sample_images()
    top5 = {}
    for filename, image in zip(samples.filenames, samples.images):
        x = torch.tensor(image).permute(2, 0, 1).float().unsqueeze(0) / 255
        x = F.interpolate(x, size=(224, 336), mode="bilinear", antialias=True)[..., 56:280]
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            top5[filename.rsplit("/", 1)[-1]] = full(x).topk(5).indices[0].tolist()
    assert top5["flower.jpg"][0] == 985
    assert top5["china.jpg"][0] in (698, 663, 442)


def test_lite0_fingerprint_is_the_file_sha256():
    cfg = ModelConfig(name="efficientnet_lite0")
    digest = hashlib.sha256(M.bundled_lite0_weights_path().read_bytes()).hexdigest()
    fingerprint = M.weights_fingerprint(cfg)
    assert fingerprint == digest[:16]
    assert fingerprint.startswith("57934424")  # the hash prefix in the file's name


# --------------------------------------------------------------------------------------------
# scalar head


def test_scalar_head_is_seeded_and_independent_of_global_rng(lite0):
    rng_before = torch.get_rng_state()
    a = M.ScalarHeadModel(lite0, head_seed=3)
    b = M.ScalarHeadModel(lite0, head_seed=3)
    c = M.ScalarHeadModel(lite0, head_seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.allclose(a.head.weight, c.head.weight)
    torch.manual_seed(999)
    assert torch.equal(M.ScalarHeadModel(lite0, head_seed=3).head.weight, a.head.weight)


def test_scalar_head_weight_has_variance_one_over_d():
    w = M.sample_head_weight(2048, head_seed=0)
    assert w.shape == (1, 2048)
    assert abs(float(w.var()) * 2048 - 1.0) < 0.15
    assert abs(float(w.mean())) < 5 / 2048  # the sample mean has std 1/D here


def test_scalar_head_model_shapes_and_output(lite0, images32):
    model = M.ScalarHeadModel(lite0, head_seed=0)
    assert model.feature_dim == 1280 and model.head.bias is None
    assert not model.training and not model.backbone.training
    assert all(p.requires_grad for p in model.backbone.parameters())
    with torch.no_grad():
        out, emb = model(images32), model.embed(images32)
    assert out.shape == (3,) and emb.shape == (3, 1280)
    torch.testing.assert_close(out, emb @ model.head.weight[0])


def test_scalar_head_needs_a_feature_dim():
    with pytest.raises(ValueError, match="feature_dim"):
        M.ScalarHeadModel(torch.nn.Flatten())
    model = M.ScalarHeadModel(torch.nn.Flatten(), feature_dim=12, head_seed=1)
    assert model(torch.ones(2, 3, 2, 2)).shape == (2,)


def test_build_model_lite0_and_normalization():
    model = M.build_model(ModelConfig(name="efficientnet_lite0", head_seed=5))
    assert isinstance(model, M.ScalarHeadModel)
    assert model.feature_dim == 1280 and model.head_seed == 5
    assert torch.equal(model.head.weight, M.sample_head_weight(1280, 5))
    assert M.normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert M.normalization("resnet50") == ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225))
    with pytest.raises(ConfigError, match="vit"):
        M.normalization("vit")
    with pytest.raises(ConfigError, match="vit"):
        M.build_model(ModelConfig(name="vit"))


# --------------------------------------------------------------------------------------------
# torchvision ResNets


def _moco_checkpoint(source_resnet18):
    """MoCo-v2 layout: query encoder under ``module.encoder_q.`` with an MLP ``fc``, plus key encoder and queue."""
    state = OrderedDict()
    for key, value in source_resnet18.state_dict().items():
        if not key.startswith("fc."):
            state[M.MOCO_PREFIX + key] = value
    state["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)
    state["module.encoder_q.fc.0.bias"] = torch.zeros(512)
    state["module.encoder_q.fc.2.weight"] = torch.zeros(128, 512)
    state["module.encoder_q.fc.2.bias"] = torch.zeros(128)
    state["module.encoder_k.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    state["module.queue"] = torch.zeros(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_resnet_torchvision_format_loads_identically(torchvision_ckpt, source_resnet18, images32, source_embeddings):
    source_state = {k: v for k, v in source_resnet18.state_dict().items() if not k.startswith("fc.")}
    for fmt in ("auto", "torchvision"):
        backbone = M.load_torchvision_resnet("resnet18", torchvision_ckpt, checkpoint_format=fmt)
        assert isinstance(backbone.fc, torch.nn.Identity) and backbone.num_features == 512
        assert not backbone.training
        loaded = backbone.state_dict()
        assert set(loaded) == set(source_state)  # every tensor, buffers included (num_batches_tracked = 7)
        assert all(torch.equal(loaded[k], v) for k, v in source_state.items())
        assert torch.equal(_embed(backbone, images32), source_embeddings)


def test_resnet_moco_format_loads_identically(source_resnet18, tmp_path, images32, source_embeddings):
    path = tmp_path / "moco_v2.pth.tar"
    checkpoint = _moco_checkpoint(source_resnet18)
    torch.save(checkpoint, path)
    assert M.detect_resnet_checkpoint_format(checkpoint) == "moco"
    for fmt in ("auto", "moco"):
        backbone = M.load_torchvision_resnet("resnet18", path, checkpoint_format=fmt)
        assert torch.equal(_embed(backbone, images32), source_embeddings)
    with pytest.raises(M.CheckpointError, match=r"unexpected keys: \[module\.encoder_q\.conv1\.weight"):
        M.load_torchvision_resnet("resnet18", path, checkpoint_format="torchvision")


def test_resnet_missing_key_is_named(source_resnet18, tmp_path):
    state = source_resnet18.state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(M.CheckpointError, match=r"missing keys: \[layer1\.0\.conv1\.weight\]"):
        M.load_torchvision_resnet("resnet18", path)


def test_resnet_wrong_shape_and_unexpected_key_are_named(source_resnet18, tmp_path):
    state = source_resnet18.state_dict()
    state["layer2.0.bn1.weight"] = torch.ones(7)
    state["layer9.extra.weight"] = torch.ones(2)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(M.CheckpointError) as info:
        M.load_torchvision_resnet("resnet18", path)
    message = str(info.value)
    assert "layer2.0.bn1.weight: checkpoint (7,) vs model (128,)" in message
    assert "unexpected keys: [layer9.extra.weight]" in message


def test_resnet_old_checkpoint_without_num_batches_tracked_loads(source_resnet18, tmp_path, images32, source_embeddings):
    state = OrderedDict((k, v) for k, v in source_resnet18.state_dict().items() if "num_batches_tracked" not in k)
    path = tmp_path / "old_style.pth"
    torch.save(state, path)
    backbone = M.load_torchvision_resnet("resnet18", path)
    assert torch.equal(_embed(backbone, images32), source_embeddings)
    assert int(backbone.bn1.num_batches_tracked) == 0


def test_resnet_default_weights_never_download(monkeypatch, tmp_path, torchvision_ckpt, images32, source_embeddings):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir
    expected_path = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert M.hub_checkpoint_path("resnet18") == expected_path

    with pytest.raises(FileNotFoundError) as info:
        M.load_torchvision_resnet("resnet18")
    assert isinstance(info.value, M.WeightsNotFoundError)
    assert str(expected_path) in str(info.value) and "offline" in str(info.value)
    with pytest.raises(M.WeightsNotFoundError, match=r"resnet50-11ad3fa6\.pth"):
        M.weights_fingerprint(ModelConfig(name="resnet50"))
    assert not expected_path.exists()  # nothing was downloaded

    expected_path.parent.mkdir(parents=True)
    shutil.copyfile(torchvision_ckpt, expected_path)
    model = M.build_model(ModelConfig(name="resnet18", head_seed=2))
    assert model.feature_dim == 512
    assert torch.equal(_embed(model.backbone, images32), source_embeddings)
    with torch.no_grad():
        assert model(images32).shape == (3,)
    digest = hashlib.sha256(expected_path.read_bytes()).hexdigest()[:16]
    assert M.weights_fingerprint(ModelConfig(name="resnet18")) == digest


def test_resnet_loads_from_a_remote_url(torchvision_ckpt, images32, source_embeddings):
    """fsspec URLs (s3:// in production) go through fsspec; memory:// exercises the same path."""
    url = "memory://entk-test/resnet18.pth"
    with fsspec.open(url, "wb") as fh:
        fh.write(torchvision_ckpt.read_bytes())
    try:
        cfg = ModelConfig(name="resnet18", weights=url)
        model = M.build_model(cfg, storage_options={})
        assert torch.equal(_embed(model.backbone, images32), source_embeddings)
        assert M.weights_fingerprint(cfg) == hashlib.sha256(torchvision_ckpt.read_bytes()).hexdigest()[:16]
    finally:
        fsspec.filesystem("memory").rm(url)


def test_fingerprint_changes_with_the_file(tmp_path, source_resnet18):
    state = source_resnet18.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    cfg = ModelConfig(name="resnet18", weights=str(path))
    first = M.weights_fingerprint(cfg)
    state["conv1.weight"] = state["conv1.weight"] + 1
    torch.save(state, path)
    assert M.weights_fingerprint(cfg) != first
    assert len(first) == 16 and int(first, 16) >= 0


def test_resnet_rejects_unknown_format_and_arch(torchvision_ckpt):
    with pytest.raises(ConfigError, match="model.checkpoint_format"):
        M.load_torchvision_resnet("resnet18", torchvision_ckpt, checkpoint_format="timm")
    with pytest.raises(ConfigError, match="resnet34"):
        M.load_torchvision_resnet("resnet34", torchvision_ckpt)


def test_missing_checkpoint_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.load_torchvision_resnet("resnet18", tmp_path / "nope.pth")


def test_building_a_model_leaves_the_global_rng_alone(torchvision_ckpt):
    state = torch.get_rng_state()
    M.load_torchvision_resnet("resnet18", torchvision_ckpt)
    M.load_efficientnet_lite0()
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------
# each backbone's own preprocessing


@pytest.mark.parametrize("name", sorted(M.BACKBONES))
def test_each_backbone_takes_its_pretrained_preprocessing(name, tmp_path):
    from PIL import Image

    from entk_ray.config import Config
    from entk_ray.data.transforms import KUMAR_MEAN, KUMAR_STD
    from entk_ray.pipeline import build_benchmark

    prep = M.preprocessing(name)
    if name == "efficientnet_lite0":  # timm's config for the same TF weights: bicubic, [-1, 1]
        cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
        assert (prep.interpolation, prep.crop_fraction, prep.mean, prep.std) == \
            (cfg.interpolation, cfg.crop_pct, tuple(cfg.mean), tuple(cfg.std)) == ("bicubic", 0.875, (0.5,) * 3, (0.5,) * 3)
    else:  # torchvision's ImageNet preset for interpolation and crop; Kumar et al.'s mean/std (the write-up's)
        preset = getattr(torchvision.models, f"ResNet{name[6:]}_Weights").IMAGENET1K_V1.transforms()
        assert (prep.interpolation, prep.crop_fraction) == (preset.interpolation.value, 224 / 256) == ("bilinear", 0.875)
        assert (prep.mean, prep.std) == (KUMAR_MEAN, KUMAR_STD) and KUMAR_STD[0] == 0.228
    assert M.normalization(name) == (prep.mean, prep.std)

    # the image benchmarks are built with exactly that transform
    for split in ("train", "val", "ood"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 10, 10) if label == "a" else (10, 10, 200)).save(
                tmp_path / split / label / "x.png")
    cfg = Config().with_overrides([f"model.name={name}", "data.benchmark=image_folder", "data.crop_size=28",
                                   f"data.id_train_dir={tmp_path / 'train'}", f"data.id_val_dir={tmp_path / 'val'}",
                                   f"data.ood_dirs=[{tmp_path / 'ood'}]", "data.n_train=null", "data.n_id_val=null",
                                   "data.n_ood=null", f"data.index_cache={tmp_path / 'cache'}"])
    steps = build_benchmark(cfg).manifest["transform"]["steps"]
    assert steps[0] == {"op": "resize", "size": 32, "interpolation": prep.interpolation, "antialias": True}
    assert steps[1] == {"op": "center_crop", "size": 28}
    assert steps[3] == {"op": "normalize", "mean": list(prep.mean), "std": list(prep.std)}


def test_remote_weights_are_hashed_once_per_version_and_again_when_replaced(monkeypatch):
    from s3_server import MotoS3Server

    from entk_ray import fingerprints

    calls = []
    real = fingerprints.file_digest
    monkeypatch.setattr(M, "file_digest", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    with MotoS3Server() as s3:
        s3.make_bucket("weights")
        fs = s3.filesystem()
        fs.pipe("weights/model.pth", b"first weights")
        cfg = ModelConfig(name="efficientnet_lite0", weights="s3://weights/model.pth")
        first = M.weights_fingerprint(cfg, s3.storage_options)
        assert M.weights_fingerprint(cfg, s3.storage_options) == first and len(calls) == 1  # no second download
        fs.pipe("weights/model.pth", b"other weights, other size")
        assert M.weights_fingerprint(cfg, s3.storage_options) != first and len(calls) == 2
