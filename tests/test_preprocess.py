"""Lens's own preprocessing against timm's reference eval transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lens.runtime.preprocess import PreprocessConfig, Preprocessor

GOLDEN_PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"]


def timm_reference(cfg: PreprocessConfig, img: Image.Image) -> np.ndarray:
    from timm.data import create_transform

    return create_transform(**cfg.to_dict()).__call__(img.convert("RGB")).numpy()


def assert_matches_timm(ours: np.ndarray, ref: np.ndarray, cfg: PreprocessConfig) -> None:
    """Lens resizes only the region the crop keeps (same taps, different float rounding), so a rare
    pixel may land one or two 8-bit levels away from timm's; everything else is identical."""
    assert ours.shape == ref.shape == tuple(cfg.input_size) and ours.dtype == np.float32
    level = 1.0 / 255.0 / min(cfg.std)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 * level + 1e-5
    assert (diff > 1e-5).mean() < 0.005


@pytest.mark.parametrize(
    "name",
    ["tf_efficientnet_lite0", "efficientnet_b0", "tf_efficientnet_b3", "efficientnetv2_s", "tf_efficientnet_lite4",
     "test_efficientnet"],
)
def test_config_comes_from_the_models_pretrained_config(name, photos):
    """Every field is timm's own resolution, and the arrays match timm's transform."""
    import timm
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config(model=timm.create_model(name, pretrained=False))
    cfg = PreprocessConfig.from_dict(data_cfg)
    assert cfg.to_dict() == {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}
    img = Image.open(io.BytesIO(photos["rocket.jpg"]))
    assert_matches_timm(Preprocessor(cfg)(img), timm_reference(cfg, img), cfg)


@pytest.mark.slow
def test_golden_logits_match_timm_transform_on_real_photos(lite0_torch, photos):
    """Same top-1, logits within 1e-3 relative, on real photos, through the real Lite0 weights."""
    pp = lite0_torch.preprocessor
    for name in GOLDEN_PHOTOS:
        img = Image.open(io.BytesIO(photos[name]))
        ours = pp(photos[name])  # the full path: safe decode of the bytes, then our transform
        ref = timm_reference(pp.cfg, img)
        lo, _ = lite0_torch.infer(ours[None])
        lr, _ = lite0_torch.infer(ref[None])
        assert lo.argmax() == lr.argmax(), name
        rel = np.abs(lo - lr).max() / np.abs(lr).max()
        assert rel < 1e-3, (name, rel)


@pytest.mark.slow
def test_draft_decoding_keeps_top1_on_a_1mp_jpeg(lite0_torch, photos):
    """Hubble deep field is a real ~0.9 MP JPEG; an upscaled copy of the cat gives a 4 MP one."""
    from lens.runtime.decode import DecodeLimits

    cat = Image.open(io.BytesIO(photos["chelsea.png"])).convert("RGB")
    big_cat = cat.resize((cat.width * 4, cat.height * 4), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big_cat.save(buf, "JPEG", quality=92)
    for data in (photos["hubble_deep_field.jpg"], buf.getvalue()):
        draft = lite0_torch.preprocessor(data)
        full = Preprocessor(lite0_torch.preprocessor.cfg, DecodeLimits(draft=False))(data)
        ld, _ = lite0_torch.infer(draft[None])
        lf, _ = lite0_torch.infer(full[None])
        assert ld.argmax() == lf.argmax()


def test_small_images_are_upscaled_then_cropped(rng):
    cfg = PreprocessConfig((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    img = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    assert np.abs(Preprocessor(cfg)(img) - timm_reference(cfg, img)).max() < 1e-5  # upscaling is exact


def test_array_and_pil_inputs_agree_with_bytes(rng):
    cfg = PreprocessConfig((3, 24, 24), "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.9)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pp = Preprocessor(cfg)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    a, b, c = pp(arr), pp(Image.fromarray(arr)), pp(buf.getvalue())
    assert np.array_equal(a, b) and np.array_equal(b, c)
    with pytest.raises(TypeError):
        pp(arr.astype(np.float32))
    with pytest.raises(TypeError):
        pp(123)  # type: ignore[arg-type]


def test_config_validation():
    with pytest.raises(ValueError, match="input_size"):
        PreprocessConfig((1, 224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig((3, 224, 224), "magic", (0.5,) * 3, (0.5,) * 3, 0.875)
    with pytest.raises(ValueError, match="crop_pct"):
        PreprocessConfig((3, 224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3, 1.5)
