"""Training (issue 3): loss goes down, resume is exact, checkpoints without the text encoder."""
import dataclasses

import pytest
import torch

from glip.train.data import Collate, GoldDetection, GoldGrounding, PseudoGrounding, can_flip, parse_filename
from glip.train.trainer import build_model, compute_loss, get_config, lr_factor, param_groups, train

# a micro model: 128 px inputs, one DyHead block (the architecture classes of the toy preset)
MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)


def micro(tmp_path, **kw):
    base = dict(model_overrides=MICRO, out=str(tmp_path / "run"), max_minutes=1e6, steps=4, batch_size=2,
                n_gold_det=8, n_gold_ground=8, ckpt_every=2)
    base.update(kw)
    return get_config("tiny", **base)


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
    items = [GoldDetection(cfg, 4)[0], GoldGrounding(cfg, 4)[1]]
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
    assert parse_filename("web_s3_000012.png") == ("web", 3, 12)


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
    batch = Collate(cfg)([GoldDetection(cfg, 2, flip_prob=0)[i] for i in range(2)])
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
    full = train(micro(tmp_path, out=str(tmp_path / "full")), progress_bar=False, quiet=True)
    part = micro(tmp_path, out=str(tmp_path / "part"))
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
    from glip.data import make_sample, odvg_record, to_odvg
    from glip.config import get_preset

    s = make_sample("web", 0, 0)
    rec = odvg_record(s, scores=[0.9] * sum(len(p.box_ids) for p in s.phrases))
    rec["grounding"]["regions"][0]["bbox"] = [1.0, 2.0, 30.0, 40.0]  # a box the hidden truth does not have
    to_odvg([rec], tmp_path / "p.jsonl")
    cfg = get_preset("toy").replace(**MICRO)
    ds = PseudoGrounding(cfg, tmp_path / "p.jsonl", flip_prob=0)
    item = ds[0]
    assert torch.allclose(item["boxes"][0], torch.tensor([1.0, 2.0, 30.0, 40.0]) * 128 / 320)
    assert len(PseudoGrounding(cfg, tmp_path / "p.jsonl", min_score=0.95)) == 0


def test_dropout_off_by_default_on_when_asked(tmp_path):
    """train_dropout=False: two forward passes in train mode agree (no drop path / dropout left);
    train_dropout=True: they differ."""
    b = None
    for flag in (False, True):
        tc = micro(tmp_path, train_dropout=flag, model_overrides={**MICRO, "swin_drop_path_rate": 0.3})
        model = build_model(tc).train()
        if b is None:
            from glip.train.trainer import StepBatches
            b = StepBatches(tc, model.config)[0]
        with torch.no_grad():
            l1, l2 = compute_loss(model, b, True).total, compute_loss(model, b, True).total
        assert (float(l1) == float(l2)) is (not flag)


def test_train_config_names():
    assert get_config("student").pseudo and get_config("student").init_from
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
