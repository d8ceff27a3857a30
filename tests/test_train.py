"""Training: items from records, loss goes down, resume is exact, checkpoints without the text encoder."""
import dataclasses

import numpy as np
import pytest
import torch

from glip.train.data import (
    Collate,
    InputSpec,
    ItemOptions,
    build_item,
    can_flip,
    open_source,
)
from glip.train.trainer import build_model, compute_loss, get_config, lr_factor, make_stream, param_groups, train

# a micro model: 128 px inputs, one DyHead block (the architecture classes of the toy preset)
MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)


def micro(tmp_path, **kw):
    base = dict(model_overrides=MICRO, out=str(tmp_path / "run"), max_minutes=1e6, steps=4, batch_size=2,
                data=("world:gold_det:0:8:0.5", "world:gold_ground:0:8:0.5"), ckpt_every=2)
    base.update(kw)
    return get_config("tiny", **base)


def world_item(cfg, split: str, i: int, flip_prob: float = 0.0, **opts):
    src = open_source(f"world:{split}:0:16")
    return build_item(src[i], src, np.random.default_rng(i), ItemOptions(flip_prob=flip_prob, **opts), InputSpec(cfg))


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_items_and_collate():
    tc = get_config("tiny", model_overrides=MICRO)
    from glip.config import get_preset

    cfg = get_preset("toy").replace(**MICRO)
    items = [world_item(cfg, "gold_det", 0), world_item(cfg, "gold_ground", 1)]
    for it in items:
        assert it["image"].shape == (3, 128, 128)
        assert it["positive_map"].shape[0] == it["boxes"].shape[0] > 0
        assert set(it["positive_map"].unique().tolist()) <= {0.0, 1.0}
        assert (it["boxes"] >= 0).all() and (it["boxes"] <= 128).all()
    batch = Collate(cfg)(items)
    T = batch["input_ids"].shape[1]
    assert batch["images"].shape == (2, 3, 128, 128)
    assert batch["attention_mask"].sum(1).max() == T
    assert all(t["positive_map"].shape[1] == T for t in batch["targets"])
    assert tc.name == "tiny"


def test_flip_rules():
    assert not can_flip("a red circle to the left of a blue star.")
    assert can_flip("red circle. blue star")


def test_lr_schedule():
    tc = get_config("teacher")
    assert lr_factor(0.0, 0, tc) == pytest.approx(0.001)
    assert lr_factor(0.1, tc.warmup_steps, tc) > 0.9
    assert lr_factor(1.0, tc.steps, tc) == pytest.approx(tc.min_lr_ratio)


def test_steps_reduce_loss(tmp_path):
    """Fitting one fixed batch: the loss drops within a few AdamW steps."""
    tc = micro(tmp_path)
    torch.manual_seed(0)
    model = build_model(tc)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, tc), lr=2e-3)
    cfg = model.config
    batch = Collate(cfg)([world_item(cfg, "gold_det", i) for i in range(2)])
    losses = []
    for _ in range(10):
        loss = compute_loss(model, batch, frozen_text=True)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(float(loss.total.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None for p in model.language_backbone.parameters())  # frozen text encoder


def test_resume_is_exact(tmp_path):
    # on the CPU: CUDA's non-deterministic kernels (atomics in the backward) drift past 1e-5 within
    # 4 steps, resumed or not (seen on an H200); the resume logic is the same on both devices
    full = train(micro(tmp_path, out=str(tmp_path / "full"), device="cpu"), progress_bar=False, quiet=True)
    part = micro(tmp_path, out=str(tmp_path / "part"), device="cpu")
    train(part, progress_bar=False, quiet=True, stop_after=2)
    assert (tmp_path / "part" / "last.pt").is_file()
    resumed = train(part, resume=True, progress_bar=False, quiet=True)
    assert resumed["steps"] == full["steps"] == 4
    assert len(resumed["history"]) == 2
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # the run's model folder loads offline, the text encoder refilled from the MiniLM package
    from glip.language import minilm_state_dict
    from glip.model import GLIP

    m = GLIP.from_pretrained(str(tmp_path / "part" / "model"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "part" / "model" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("language_backbone.") for k in f.keys())
    ref = minilm_state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(m.language_backbone.body.model.embeddings.word_embeddings.weight, ref)
    for k, v in b.items():
        if not k.startswith("language_backbone."):
            assert torch.allclose(m.state_dict()[k], v), k


def test_pseudo_dataset_uses_only_the_file(tmp_path):
    """Regions come from the ODVG file, pixels from the image file it names (never re-rendered from the name);
    regions under min_score are dropped, a record with none left yields no item."""
    from PIL import Image

    from glip.config import get_preset
    from glip.data import make_sample, odvg_record, to_odvg
    from glip.errors import ImageError

    s = make_sample("web", 0, 0)
    rec = odvg_record(s, scores=[0.9] * sum(len(p.box_ids) for p in s.phrases))
    rec["grounding"]["regions"][0]["bbox"] = [1.0, 2.0, 30.0, 40.0]  # a box the hidden truth does not have
    to_odvg([rec], tmp_path / "p.jsonl")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (320, 320), (9, 200, 30)).save(tmp_path / "img" / rec["filename"])
    cfg = get_preset("toy").replace(**MICRO)
    src = open_source(f"odvg:{tmp_path / 'p.jsonl'}:{tmp_path / 'img'}")
    item = build_item(src[0], src, np.random.default_rng(0), ItemOptions(flip_prob=0), InputSpec(cfg))
    assert torch.allclose(item["boxes"][0], torch.tensor([1.0, 2.0, 30.0, 40.0]) * 128 / 320)
    assert float(item["image"][1].std()) < 1e-4  # the file's flat image, not the rendered scene
    assert build_item(src[0], src, np.random.default_rng(0), ItemOptions(min_score=0.95), InputSpec(cfg)) is None
    with pytest.raises(ImageError, match="not found"):  # no file: an error naming it, no re-rendering
        bad = open_source(f"odvg:{tmp_path / 'p.jsonl'}:{tmp_path}")
        build_item(bad[0], bad, np.random.default_rng(0), ItemOptions(), InputSpec(cfg))


def test_dropout_off_by_default_on_when_asked(tmp_path):
    """train_dropout=False: two forward passes in train mode agree (no drop path / dropout left);
    train_dropout=True: they differ."""
    b = None
    for flag in (False, True):
        tc = micro(tmp_path, train_dropout=flag, model_overrides={**MICRO, "swin_drop_path_rate": 0.3})
        model = build_model(tc).train()
        if b is None:
            b = make_stream(tc, model.config)[0][0]
        with torch.no_grad():
            l1, l2 = compute_loss(model, b, True).total, compute_loss(model, b, True).total
        assert (float(l1) == float(l2)) is (not flag)


def test_train_config_names():
    pseudo = lambda n: [d for d in get_config(n).data if d.startswith("odvg:")]  # noqa: E731
    assert pseudo("student") and get_config("student").init_from
    # the pipeline's hand-offs: teacher → student → student2 (each starts from the previous run's model)
    assert get_config("student").init_from == get_config("teacher").out + "/model"
    assert get_config("student2").init_from == get_config("student").out + "/model"
    assert pseudo("student2") != pseudo("student")
    assert get_config("student3").init_from == get_config("student2").out + "/model"
    assert len({tuple(pseudo(n)) for n in ("student", "student2", "student3")}) == 3
    with pytest.raises(ValueError):
        get_config("nope")
    assert dataclasses.asdict(get_config("teacher"))["steps"] > 0


def test_linear_probe_separates_what_is_there_and_not_what_is_not():
    import numpy as np

    from glip.train.diagnose import probe_accuracy

    rng = np.random.default_rng(0)
    labels = [["a", "b", "c"][i % 3] for i in range(300)]
    x = rng.normal(size=(300, 16))
    x_sep = x.copy()
    x_sep[:, 0] += 6.0 * np.array([["a", "b", "c"].index(v) for v in labels])  # one informative direction
    assert probe_accuracy(x_sep, labels) > 0.95
    assert probe_accuracy(x, labels) < 0.6  # pure noise: near chance (1/3)


def test_stage_features_one_row_per_object():
    from app.models import random_toy
    from glip.data import make_sample
    from glip.train.diagnose import STAGES, stage_features

    model = random_toy()
    feats, colors, shapes = stage_features(model, n=2, seed=5)
    n_obj = sum(len(make_sample("test_det", i, 5).objs) for i in range(2))
    assert set(feats) == set(STAGES) and len(colors) == len(shapes) == n_obj
    assert feats["pixel"].shape == (n_obj, 3) and feats["DyHead"].shape == (n_obj, model.config.channels)


def test_share_attribute_words_marks_every_occurrence_of_the_regions_own_attributes():
    from glip.data import KNOWN_WORDS as ATTRIBUTE_WORDS
    from glip.train.data import share_attribute_words

    caption = "red circle. red square. blue circle. turquoise circle. big red star"
    find = lambda w, k=0: (lambda i: (i, i + len(w)))([i for i in range(len(caption)) if caption.startswith(w, i)][k])
    red_circle, turq_circle, big_red_star = [find("red circle")], [find("turquoise circle")], [find("big red star")]
    got = share_attribute_words(caption, [red_circle, turq_circle, big_red_star], ATTRIBUTE_WORDS)
    text = lambda spans: sorted(caption[a:b] for a, b in spans)
    # red circle: its own span + the other "red"s and "circle"s, nothing else
    assert got[0][0] == red_circle[0]
    assert text(got[0][1:]) == ["circle", "circle", "red", "red"]
    # a novel word is not an annotator's attribute word: never shared, but the known "circle" is
    assert "turquoise" not in ATTRIBUTE_WORDS
    assert text(got[1][1:]) == ["circle", "circle"]
    # size words are absolute in this world (a gap between the small and big ranges): shared like the rest
    assert text(got[2][1:]) == ["red", "red"]
    # the shared spans are whole words (no "red" inside "colored")
    assert share_attribute_words("a red cube, colored", [[(2, 5)]], ATTRIBUTE_WORDS) == [[(2, 5)]]


def test_shared_words_reach_the_positive_map():
    from PIL import Image

    from glip.config import get_preset
    from glip.train.data import InputSpec, make_item

    spec = InputSpec(get_preset("toy").replace(**MICRO))
    caption = "red circle. red square. blue circle"
    img = Image.new("RGB", (64, 64))
    plain = make_item(img, caption, [[(0, 10)]], [[1, 1, 9, 9]], spec)["positive_map"]
    shared = make_item(img, caption, [[(0, 10)]], [[1, 1, 9, 9]], spec, share_words=frozenset({"red", "circle"}))["positive_map"]
    assert plain.sum() == 2 and shared.sum() == 4  # one token per word: + "red" (of red square) + "circle"
    assert (shared >= plain).all()


def test_attribute_prompt_grounds_each_box_to_its_own_word():
    import numpy as np

    from glip.data import GOLD_COLORS, GOLD_SHAPES, make_sample
    from glip.train.data import attribute_prompt

    seen = set()
    src = open_source("world:gold_det:0:12")
    for i in range(12):
        s = make_sample("gold_det", i, 0)
        caption, regions = attribute_prompt(src[i], src.vocabularies, np.random.default_rng(i))
        spans, boxes = [r.spans for r in regions], [r.box for r in regions]
        words = caption.split(". ")
        attr = "color" if set(words) == set(GOLD_COLORS) else "shape"
        assert sorted(words) == sorted(GOLD_COLORS if attr == "color" else GOLD_SHAPES)
        assert len(spans) == len(boxes) == len(s.objs)
        by_box = {tuple(o.box): o for o in s.objs}
        for sp, b in zip(spans, boxes):
            assert caption[sp[0][0]:sp[0][1]] == getattr(by_box[tuple(b)], attr)
        seen.add(attr)
    assert seen == {"color", "shape"}


def test_token_accuracy_and_projection_spread_on_a_micro_model():
    from glip.config import get_preset
    from glip.model import GLIP
    from glip.train.diagnose import attribute_token_accuracy, projection_spread

    torch.manual_seed(0)
    model = GLIP(get_preset("toy").replace(**MICRO))
    acc = attribute_token_accuracy(model, "color", n=2)
    assert set(acc) == {"P3", "P4", "P5"} and all(0.0 <= v <= 1.0 for v in acc.values())
    spread = projection_spread(model)
    assert -1.0 <= spread["cosine"] <= 1.0 and spread["spread"] > 0
    # a projection that ignores its input (weight 0, bias only) makes every word alike: cosine 1, no spread
    with torch.no_grad():
        model.rpn.head.dot_product_projection_text.weight.zero_()
    same = projection_spread(model)
    assert same["cosine"] > 0.999 and same["spread"] < 1e-3


def test_whitened_text_projection_is_centred_decorrelated_and_keeps_the_default_scale():
    import torch.nn.functional as F

    from glip.config import get_preset
    from glip.model import GLIP
    from glip.prompts import tokenize
    from glip.train.data import open_sources, training_prompts
    from glip.train.trainer import whiten_text_projection

    torch.manual_seed(0)
    model = GLIP(get_preset("toy").replace(**MICRO)).eval()
    sources, weights = open_sources(get_config("teacher").data)
    captions = training_prompts(sources, weights, 40, model.config.max_query_len)
    assert any(". " in c for c in captions[::2]) and len(set(captions)) > 30
    enc = tokenize(captions, max_len=model.config.max_query_len)
    with torch.no_grad():
        text = model.encode_text(enc["input_ids"], enc["attention_mask"])
        t = (F.normalize(text.embedded, dim=-1) / 2.0)[enc["attention_mask"].bool()]
        before = model.rpn.head.dot_product_projection_text(t)
        whiten_text_projection(model, captions)
        lin = model.rpn.head.dot_product_projection_text
        after = t.double() @ lin.weight.double().T + lin.bias.double()
    C = after.shape[1]
    assert after.mean(0).abs().max() < 1e-2 * after.norm(dim=1).mean()          # centred (fp32 weights)
    cov = torch.cov(after.T)
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 2e-2 * torch.diag(cov).mean()  # decorrelated
    assert torch.allclose(torch.diag(cov), torch.diag(cov).mean().expand(C), rtol=2e-2)    # equal variance
    assert abs(float(after.norm(dim=1).mean() / before.norm(dim=1).mean()) - 1) < 1e-2    # same scale


def test_screened_out_pseudo_phrases_carry_no_loss(tmp_path):
    """A web caption names three objects; the teacher kept only the first. With mask_unlabelled the tokens of
    the other two noun phrases are out of the loss (loss_mask 0): their objects are in the image, and without
    the mask their words would be trained as negatives on them. Every other token keeps its loss."""
    from glip.config import get_preset
    from glip.data import to_odvg
    from glip.prompts import get_tokenizer
    from glip.train.data import unlabelled_phrase_spans

    caption = "clip art with a big red square, a big turquoise star and a blue circle."
    kept = [[14, 30]]  # "a big red square"
    rec = {"filename": "web_s0_000000.png", "height": 320, "width": 320,
           "grounding": {"caption": caption, "regions": [{"bbox": [72.0, 75.0, 151.0, 153.0], "phrase": "a big red square",
                                                           "tokens_positive": [kept[0]], "score": 0.6}]}}
    to_odvg([rec], tmp_path / "p.jsonl")
    ignored = unlabelled_phrase_spans(caption, [[tuple(kept[0])]])
    assert {caption[b:e] for b, e in ignored} >= {"a big turquoise star", "a blue circle"}
    assert all(e <= kept[0][0] or b >= kept[0][1] for b, e in ignored)

    from PIL import Image

    Image.new("RGB", (320, 320)).save(tmp_path / rec["filename"])
    cfg = get_preset("toy").replace(**MICRO)
    src = open_source(f"odvg:{tmp_path / 'p.jsonl'}")
    item = build_item(src[0], src, np.random.default_rng(0), ItemOptions(flip_prob=0), InputSpec(cfg))
    plain = build_item(src[0], src, np.random.default_rng(0), ItemOptions(flip_prob=0, mask_unlabelled=False),
                       InputSpec(cfg))
    tok = get_tokenizer()
    enc = tok(caption, return_offsets_mapping=True)
    words = {}
    for t, (b, e) in enumerate(enc["offset_mapping"]):
        if e > b:
            words.setdefault(caption[b:e], []).append(int(item["loss_mask"][t]))
    assert words["turquoise"] == [0] and words["star"] == [0] and words["circle"] == [0] and words["blue"] == [0]
    assert words["red"] == [1] and words["square"] == [1] and words["and"] == [1]
    assert words["big"] == [1, 0] and words["a"] == [1, 0, 0]
    assert torch.all(plain["loss_mask"] == 1)
    assert torch.all(item["loss_mask"][len(enc["input_ids"]):] == 1)  # padding is the attention mask's job

    batch = Collate(cfg)([item, world_item(cfg, "gold_ground", 0)])
    assert torch.equal(batch["loss_mask"][1], batch["attention_mask"][1])
    assert torch.equal(batch["loss_mask"][0], batch["attention_mask"][0] * item["loss_mask"][:batch["loss_mask"].shape[1]])
    assert batch["loss_mask"][0].sum() < batch["attention_mask"][0].sum()

    torch.manual_seed(0)
    model = build_model(get_config("tiny", model_overrides=MICRO))
    masked = compute_loss(model, batch, frozen_text=True, contrastive_weight=1.0).token
    unmasked = compute_loss(model, {**batch, "loss_mask": batch["attention_mask"]}, True, 1.0).token
    assert masked < unmasked  # fewer negatives counted: compute_loss reads the batch's loss_mask


def test_train_cli_passes_device_and_workers(tmp_path, capsys):
    """`python -m glip train --device cpu --workers 0`: the options reach the run's config."""
    import json

    from glip.__main__ import main

    out = tmp_path / "cli"
    assert main(["train", "--config", "tiny", "--steps", "2", "--device", "cpu", "--workers", "0",
                 "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["device"] == "cpu" and saved["num_workers"] == 0 and saved["steps"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    assert (out / "model" / "model.safetensors").is_file()


def test_a_finished_run_is_never_overwritten_and_a_bad_out_fails_before_the_model(tmp_path, capsys, monkeypatch):
    from glip.__main__ import main
    from glip.train import trainer

    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--steps", "2", "--device", "cpu", "--workers", "0", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 2  # the same folder again, without --resume
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already holds a training run" in err and "--resume" in err
    assert "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --resume where there is nothing to resume: says so, then trains
    fresh = tmp_path / "fresh"
    assert main(args + ["--out", str(fresh), "--resume"]) == 0
    assert "no resume state" in capsys.readouterr().out and (fresh / "last.pt").is_file()
    # an output path that cannot be a folder: one line, and the model is never built
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    assert main(args + ["--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write to the output folder") and "\n" not in err
    # a run that stops before writing (here: the model cannot be built) leaves no empty folder behind
    from glip.errors import ConfigError

    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: (_ for _ in ()).throw(ConfigError("no model")))
    assert main(args + ["--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
