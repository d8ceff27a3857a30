"""Preprocessing split in two: the CPU half (decode, key, resize to uint8) done ahead by `prepare_image`, the
normalisation done where the batch is. The split changes no value: the normalised batch, `predict`'s results
and the labeller's lines equal the one-step path's."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from glip.datasets import open_dataset
from glip.image import batch_images, batch_pixels, resize_pixels, to_tensor
from glip.label import LabelSettings, label_shard
from glip.predictor import PreparedImage, _anchor_rows

MEAN, STD = (102.9801, 115.9465, 122.7717), (57.375, 57.12, 58.395)


def _official(im: Image.Image, min_size: int, max_size: int) -> torch.Tensor:
    """The official transform, op by op: resize (PIL bilinear), ToTensor, ×255 BGR, Normalize."""
    from glip.image import resized_hw

    h, w = resized_hw(im.height, im.width, min_size, max_size)
    im = im.resize((w, h), Image.BILINEAR) if (h, w) != (im.height, im.width) else im
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)
    x = x[[2, 1, 0]] * 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1, max_size=3),
       min_size=st.integers(8, 64), extra=st.integers(0, 64), div=st.sampled_from([0, 1, 32]))
def test_uint8_batch_normalised_in_place_equals_normalising_each_image_first(sizes, min_size, extra, div):
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    max_size = min_size + extra
    ref, ref_hw = batch_images([_official(im, min_size, max_size) for im in images], div)
    pixels = [resize_pixels(im, min_size, max_size) for im in images]
    assert all(p.dtype == torch.uint8 for p in pixels)
    got, hw = batch_pixels(pixels, MEAN, STD, div)
    assert hw == ref_hw and got.dtype == ref.dtype
    assert torch.equal(got, ref)  # bit for bit, padding zeros included
    assert torch.equal(to_tensor(images[0], min_size, max_size, MEAN, STD), _official(images[0], min_size, max_size))


def test_predict_takes_a_prepared_image_and_returns_what_the_image_gives(tiny_model):
    img = _image(150, 110, 7)
    prompt = "person . dog . a red car"
    pred = tiny_model.predictor
    pred.clear_cache()
    ref = tiny_model.predict(img, prompt, threshold=0.0)
    pred.clear_cache()
    ready = tiny_model.prepare_image(img)
    assert isinstance(ready, PreparedImage) and "pixels" in vars(ready)  # resized already, in the caller's thread
    assert ready.pixels.shape[1:] == ready.hw and ready.size == img.size
    got = tiny_model.predict(ready, prompt, threshold=0.0)
    np.testing.assert_array_equal(got.boxes, ref.boxes)
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.token_scores, ref.token_scores)
    batch = tiny_model.predict([ready, img], [prompt, prompt], threshold=0.0)
    np.testing.assert_array_equal(batch[0].scores, batch[1].scores)  # the same image, prepared or not
    # prepared for another input size: predict prepares it again from its pixels, as for the image itself
    pred.clear_cache()
    small = tiny_model.predict(img, prompt, threshold=0.0, min_size=96, max_size=128)
    pred.clear_cache()
    again = tiny_model.predict(ready, prompt, threshold=0.0, min_size=96, max_size=128)
    assert max(again.states[0].hw) <= 128
    np.testing.assert_array_equal(again.scores, small.scores)
    np.testing.assert_array_equal(again.boxes, small.boxes)


class _PredictOnly:
    """A model seen through `predict` alone: the labeller cannot prepare its images ahead."""

    def __init__(self, model):
        self.model = model

    def predict(self, *a, **k):
        return self.model.predict(*a, **k)

    def eval(self):
        return self


def test_labelling_with_images_resized_in_the_reader_writes_the_same_lines(tiny_model):
    recs = list(open_dataset("world:web:0:5"))
    st_ = LabelSettings(threshold=0.0, batch_size=2)
    tiny_model.predictor.clear_cache()
    ahead = label_shard(tiny_model, recs, st_, prefetch=4)
    tiny_model.predictor.clear_cache()
    plain = label_shard(_PredictOnly(tiny_model), recs, st_, prefetch=0)
    assert ahead.records == plain.records and ahead.rejects == plain.rejects
    assert sum(len(r["grounding"]["regions"]) for r in ahead.records) > 0


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_anchor_rows_gather_every_level_as_the_per_box_loop(data):
    shapes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    t = data.draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = [torch.randn(1, hw, t, generator=g) for hw in shapes]
    n = data.draw(st.integers(0, 20))
    level = torch.tensor([data.draw(st.integers(0, len(shapes) - 1)) for _ in range(n)], dtype=torch.long)
    loc = torch.tensor([data.draw(st.integers(0, shapes[int(lv)] - 1)) for lv in level], dtype=torch.long)
    rows = _anchor_rows(logits, level, loc)
    ref = torch.stack([logits[int(lv)][0, int(lc)] for lv, lc in zip(level, loc)]) if n else torch.zeros(0, t)
    assert torch.equal(rows, ref)


def test_anchor_rows_read_nothing_back_to_the_host():
    from test_device_path import _Syncs

    logits = [torch.randn(1, 6, 3), torch.randn(1, 2, 3)]
    level, loc = torch.tensor([1, 0, 1]), torch.tensor([1, 5, 0])
    _anchor_rows(logits, level, loc)
    with _Syncs() as probe:
        _anchor_rows(logits, level, loc)
    assert probe.seen == []


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 70_000_000), w=st.integers(1, 70_000_000), min_size=st.integers(1, 1200),
       extra=st.integers(0, 1000))
def test_every_resize_has_pixels_and_stays_near_max_size(h, w, min_size, extra):
    from glip.image import resized_hw

    max_size = min_size + extra
    out = resized_hw(h, w, min_size, max_size)
    assert min(out) >= 1
    assert max(out) <= max_size * (1 + 1 / min(out))  # the official rule's rounding, nothing more
    assert (out[0] >= out[1]) == (h >= w) or h == w or min(out) == max(out)


def test_a_needle_thin_image_is_grounded_not_refused(tiny_model):
    for size in [(1, 3000), (3000, 1), (2, 5000)]:
        res = tiny_model.predict(Image.new("RGB", size, (200, 30, 30)), "a red line", threshold=0.0)
        assert res.image_size == size and max(res.states[0].hw) <= tiny_model.config.max_size_test
        assert (res.boxes[:, 2] <= size[0]).all() and (res.boxes[:, 3] <= size[1]).all()
