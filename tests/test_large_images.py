"""Large and hostile images: boxes in the original image's frame, the pixel limit read from the header
before decoding, JPEGs decoded at a reduced scale, EXIF orientation on large photos."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from glip import GLIP, ImageError, open_image, probe_size
from glip.data import make_sample
from glip.image import MAX_PIXELS, MAX_SIDE, fit_size, load_image

K = 15  # 320 px scenes → 4800 px: over MAX_SIDE (4096) and over twice the toy model's input


@pytest.fixture(scope="module")
def toy():
    return GLIP.from_pretrained("toy-student", device="cpu")


@pytest.fixture(scope="module")
def scene():
    s = make_sample("test_det", 0, 1)
    return s.image, ". ".join(sorted({f"{o.color} {o.shape}" for o in s.objs}))


def _same_detections(big, small, k: float, tol: float):
    """The best box of each phrase agrees between a prediction on a large image and one on a small copy,
    the small one's boxes scaled back by k."""
    a, b = small.best_per_phrase(1), big.best_per_phrase(1)
    assert len(a) > 0 and list(a.phrase_ids) == list(b.phrase_ids)
    np.testing.assert_allclose(b.boxes, a.boxes * k, atol=tol)
    np.testing.assert_allclose(b.scores, a.scores, atol=0.02)


def test_boxes_of_a_large_image_are_in_its_original_frame(toy, scene):
    image, prompt = scene
    big = image.resize((image.width * K, image.height * K), Image.BILINEAR)
    assert max(big.size) > MAX_SIDE
    small = toy.predict(image, prompt, threshold=0.3)           # the manually resized copy
    res = toy.predict(big, prompt, threshold=0.3)
    assert res.image_size == big.size == (4800, 4800)
    _same_detections(res, small, K, tol=0.005 * big.width)      # the old frame was off by 4096/4800
    coco = res.to_coco()
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == big.size
    x1, y1, w, h = coco["annotations"][0]["bbox"]
    np.testing.assert_allclose([x1, y1, x1 + w, y1 + h], res.boxes[0], atol=0.01)
    np.testing.assert_array_equal(res.to_supervision().xyxy, res.boxes)
    np.testing.assert_allclose([d["box"] for d in res.to_json()], res.boxes, atol=0.01)


def test_large_jpeg_with_exif_rotation_and_a_file_path(toy, scene, tmp_path):
    """A phone photo: stored sideways with EXIF orientation 6, 6000 px long side; read from a path."""
    image, prompt = scene
    big = image.resize((image.width * K, image.height * K), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    path = tmp_path / "photo.jpg"
    big.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif.tobytes())
    assert probe_size(path) == big.size
    res = toy.predict(path, prompt, threshold=0.3)
    assert res.image_size == big.size
    _same_detections(res, toy.predict(image, prompt, threshold=0.3), K, tol=0.01 * big.width)


def test_draw_result_scales_boxes_to_the_pixels_it_draws_on(toy, scene):
    from glip import draw_result

    image, prompt = scene
    big = image.resize((image.width * K, image.height * K), Image.NEAREST)
    res = toy.predict(big, prompt, threshold=0.3)
    out = draw_result(res, big)
    assert out.size == fit_size(big.size, MAX_SIDE)
    # the best box's outline is drawn where the box is, in the shrunk frame
    x1, y1, x2, y2 = (res.boxes[0] * out.width / big.width).round().astype(int)
    before, after = np.asarray(load_image(big)), np.asarray(out)
    assert (before[y1:y2, x1 + 1] != after[y1:y2, x1 + 1]).any(axis=-1).mean() > 0.8


def test_heatmaps_default_to_the_loaded_size_not_the_original(toy, scene):
    image, prompt = scene
    big = image.resize((image.width * K, image.height * K), Image.NEAREST)
    res = toy.predict(big, prompt, threshold=0.3)
    _, combined = toy.predictor.token_heatmaps(res, phrase=0)
    W, H = fit_size(big.size, MAX_SIDE)
    assert combined.shape == (H, W)
    _, small = toy.predictor.token_heatmaps(res, phrase=0, size=(64, 32))
    assert small.shape == (32, 64)


# --- the pixel limit, from the header --------------------------------------------------------------------
def _png_header_only(w: int, h: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims w×h RGB pixels, followed by `idat` (possibly garbage) and no real image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_oversized_canvas_is_refused_from_the_header_before_decoding(tmp_path):
    """13000×13000 claimed by a file of a few bytes: refused as too large (the garbage pixel data would
    give 'corrupt' if anything were decoded)."""
    data = _png_header_only(13000, 13000, idat=b"garbage")
    for src in (data, io.BytesIO(data)):
        with pytest.raises(ImageError, match="too large"):
            probe_size(src)
    with pytest.raises(ImageError, match="too large"):
        load_image(data)
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageError, match="too large"):
        open_image(tmp_path / "bomb.png")
    # just over the limit, under PIL's own bomb threshold: still ours to refuse
    with pytest.raises(ImageError, match=f"limit {MAX_PIXELS:,}"):
        probe_size(_png_header_only(8001, 8000, idat=b"garbage"))


def test_probe_size_reads_only_the_header():
    data = _png_header_only(7999, 7999, idat=zlib.compress(b"\0" * 100))  # truncated pixel data
    assert probe_size(data) == (7999, 7999)
    with pytest.raises(ImageError, match="corrupt"):
        load_image(data)  # decoding finds the truncation
    with pytest.raises(ImageError, match="not an image"):
        probe_size(b"plain text")
    with pytest.raises(ImageError, match="too large"):
        probe_size(np.zeros((9000, 8000), np.uint8))


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    """Peak memory of loading a 6000×6000 JPEG for a 1333-px model: the decoder runs at 1/4 scale, so the
    process grows by far less than the 108 MB a full decode needs (read from a fresh process's own peak RSS, which
    a child of the large test process can only measure as VmHWM)."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 6000), (200, 30, 40)).save(path, "JPEG", quality=90)
    code = (
        "import sys\n"
        "from glip.image import open_image\n"
        "from glip.runtime import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "li = open_image(sys.argv[1], max_side=1333)\n"
        "grew = peak_rss_mb() - before\n"
        "print(li.size, li.pixels.size, int(grew))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, check=True)
    grew_mb = int(out.stdout.split()[-1])
    assert "(6000, 6000) (1333, 1333)" in out.stdout, out.stdout
    assert grew_mb < 50, f"loading grew the process by {grew_mb} MB"
