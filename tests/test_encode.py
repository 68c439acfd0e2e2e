"""melano.encode.save_like, checked on the files: a translation is written like its real source."""

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from melano import data, encode, synth


def _translation(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return smooth


def _jpeg(path, size=(96, 96), **kw):
    _translation(max(size), seed=1).resize(size).save(path, "JPEG", **kw)
    return path


@pytest.fixture(scope="module")
def synthetic_sources(tmp_path_factory):
    """Real files from melano.synth: JPEG q80-95 with libjpeg's default 4:2:0 chroma, 96 x 96."""
    root = tmp_path_factory.mktemp("encode")
    synth.generate(synth.SynthConfig(out=str(root), benign=12, malignant=4, size=96, seed=3))
    return [r.path for r in data.read_index(root).records]


def test_jpeg_keeps_the_sources_tables_subsampling_and_size(synthetic_sources, tmp_path):
    seen_tables = set()
    for i, src in enumerate(synthetic_sources):
        out = encode.save_like(_translation(64, i), src, tmp_path / f"syn_{i}")
        assert out == tmp_path / f"syn_{i}.jpg"
        with Image.open(src) as a, Image.open(out) as b:
            assert b.format == "JPEG" and b.size == a.size == (96, 96) and b.mode == a.mode
            assert b.quantization == a.quantization
            assert JpegImagePlugin.get_sampling(b) == JpegImagePlugin.get_sampling(a) == 2  # 4:2:0
            assert not b.getexif()  # orientation already applied; no other metadata added
            seen_tables.add(tuple(a.quantization[0]))
    assert len(seen_tables) > 1  # the sources differ in quality, and each translation follows its own
    # the old way (q95, 4:4:4, at the GAN's size) differs in all three
    old = tmp_path / "old.jpg"
    _translation(64).save(old, quality=95, subsampling=0)
    with Image.open(old) as b, Image.open(synthetic_sources[0]) as a:
        assert b.size != a.size and b.quantization != a.quantization
        assert JpegImagePlugin.get_sampling(b) != JpegImagePlugin.get_sampling(a)


@pytest.mark.parametrize("kw", [dict(quality=70, subsampling=0), dict(quality=90, subsampling=1),
                                dict(quality=85, progressive=True), dict(quality=88, dpi=(300, 300))])
def test_jpeg_settings_follow_the_source(tmp_path, kw):
    src = _jpeg(tmp_path / "src.jpeg", **kw)
    out = encode.save_like(_translation(48), src, tmp_path / "out.png")  # the source decides the format
    assert out.suffix == ".jpeg"
    with Image.open(src) as a, Image.open(out) as b:
        assert b.quantization == a.quantization
        assert JpegImagePlugin.get_sampling(b) == JpegImagePlugin.get_sampling(a)
        assert bool(b.info.get("progressive")) == bool(a.info.get("progressive"))
        assert b.info.get("dpi") == a.info.get("dpi")


def test_grayscale_jpeg_stays_grayscale(tmp_path):
    src = tmp_path / "grey.jpg"
    _translation(80).convert("L").save(src, quality=82)
    out = encode.save_like(_translation(64), src, tmp_path / "out")
    with Image.open(src) as a, Image.open(out) as b:
        assert b.mode == "L" and b.size == (80, 80) and b.quantization == a.quantization


def test_non_square_source_keeps_its_size_and_border(tmp_path):
    """The translation replaces the centre square (what melano's loader crops); the border stays."""
    src = tmp_path / "wide.png"  # PNG, so the comparison is exact
    rng = np.random.default_rng(4)
    source = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    Image.fromarray(source).save(src)
    fake = np.asarray(_translation(60))
    out = encode.save_like(Image.fromarray(fake), src, tmp_path / "out")
    written = np.asarray(Image.open(out))
    assert written.shape == source.shape
    assert np.array_equal(written[:, 20:80], fake)
    assert np.array_equal(written[:, :20], source[:, :20]) and np.array_equal(written[:, 80:], source[:, 80:])
    assert np.array_equal(data.load_image(out, 60), fake)  # what the pipeline reads back


def test_png_is_lossless_and_keeps_alpha(tmp_path):
    src = tmp_path / "src.png"
    _translation(64, 2).save(src)
    fake = _translation(64, 3)
    out = encode.save_like(fake, src, tmp_path / "out.jpg")
    assert out.suffix == ".png" and Image.open(out).format == "PNG"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(fake))
    # a smaller translation is resized to the source's size, then stored without loss
    small = encode.save_like(_translation(32, 3), src, tmp_path / "small")
    assert Image.open(small).size == (64, 64)
    rgba = tmp_path / "rgba.png"
    alpha = Image.new("L", (64, 64), 200)
    im = _translation(64, 2).convert("RGBA")
    im.putalpha(alpha)
    im.save(rgba)
    out = encode.save_like(fake, rgba, tmp_path / "out_rgba")
    assert Image.open(out).mode == "RGBA" and np.array_equal(np.asarray(Image.open(out))[..., 3], np.asarray(alpha))


def test_exif_rotated_source(tmp_path):
    """A source stored 96 wide x 64 high with EXIF orientation 6 shows as 64 x 96: the translation is
    written as shown, without EXIF, so it decodes the same way round."""
    src = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _translation(96).resize((96, 64)).save(src, quality=90, exif=exif)
    out = encode.save_like(_translation(64), src, tmp_path / "out")
    with Image.open(out) as b:
        assert b.size == (64, 96) and b.getexif().get(0x0112) is None


def test_refusals(tmp_path):
    bmp = tmp_path / "src.bmp"
    _translation(32).save(bmp)
    with pytest.raises(ValueError, match="not JPEG or PNG"):
        encode.save_like(_translation(32), bmp, tmp_path / "out")
    with pytest.raises(ValueError, match="PIL.Image"):
        encode.save_like(np.zeros((32, 32, 3), np.uint8), bmp, tmp_path / "out")


@pytest.mark.parametrize("n, size", [(48, 64), (64, 48), (48, 192), (30, 17)])
@pytest.mark.parametrize("method", [Image.Resampling.LANCZOS, Image.Resampling.BILINEAR])
def test_float_resize_is_pillows(n, size, method):
    """The matrix form gives what Pillow's "F" mode gives channel by channel, negative values and
    fractions included (the oracle: Pillow itself)."""
    a = np.random.default_rng(n + size).normal(0, 40, (n, n, 3)).astype(np.float32)
    ours = encode._resize_float(a, size, method)
    pillow = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), "F").resize((size, size), method))
                       for c in range(3)], -1)
    assert ours.shape == pillow.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pillow, rtol=0, atol=1e-3)


@pytest.mark.parametrize("side", [96, 300])
def test_enlarged_translation_reads_back_as_itself(tmp_path, side):
    """The loader shrinks the written file back to the GAN's size: with back-projection that gives the
    translation (within a grey level), where plain bicubic enlarging leaves it visibly blurred."""
    rng = np.random.default_rng(5)
    fake = np.clip(np.asarray(_translation(64, 6), np.float64) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    src = tmp_path / "src.png"
    _translation(side, 7).save(src)
    out = encode.save_like(Image.fromarray(fake), src, tmp_path / "out")
    assert Image.open(out).size == (side, side)
    back = data.load_image(out, 64).astype(float)
    plain = tmp_path / "plain.png"
    Image.fromarray(fake).resize((side, side), Image.Resampling.BICUBIC).save(plain)
    blurred = data.load_image(plain, 64).astype(float)
    err, err_plain = np.abs(back - fake).mean(), np.abs(blurred - fake).mean()
    assert err < 1.5 and err < err_plain / 3
