"""Evaluation (issue 3): pycocotools AP, Recall@k, the eval entry points, the shipped checkpoints."""
import numpy as np
import pytest
import torch

from glip.checkpoint import shipped_models
from glip.data import ALL_CATEGORIES, make_split
from glip.evaluate import coco_metrics, evaluate, evaluate_detection, evaluate_grounding, recall_at_k, sample_prompt
from glip.results import GroundingResult


def gt_predictions(samples):
    cat = {n: i + 1 for i, n in enumerate(ALL_CATEGORIES)}
    return [{"boxes": np.array([o.box for o in s.objs]), "scores": np.ones(len(s.objs)),
             "category_ids": np.array([cat[o.category] for o in s.objs])} for s in samples]


def test_ap_is_one_for_ground_truth():
    samples = make_split("test_det", 4, seed=3)
    m = coco_metrics(samples, gt_predictions(samples))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)


def test_ap_drops_for_wrong_boxes():
    samples = make_split("test_det", 4, seed=3)
    preds = gt_predictions(samples)
    for p in preds:
        p["boxes"] = p["boxes"] + 40.0
    assert coco_metrics(samples, preds)["AP50"] < 0.5
    assert coco_metrics(samples, [{"boxes": np.zeros((0, 4)), "scores": [], "category_ids": []}] * 4)["AP"] == 0.0


def _result(sample, boxes, ids, scores):
    prompt, _ = sample_prompt(sample, only_grounded=True)
    return GroundingResult(boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                           phrase_ids=np.array(ids, np.int64), prompt=prompt, tokens=[],
                           token_scores=np.zeros((len(ids), 0)), image_size=sample.image.size)


def test_recall_at_k():
    samples = make_split("test_novel", 3, seed=5)
    perfect = [_result(s, [s.objs[s.phrases[0].box_ids[0]].box], [0], [0.9]) for s in samples]
    assert recall_at_k(perfect, samples)["R@1"] == 1.0
    # right box ranked second: R@1 misses, R@5 hits
    wrong = [(0.0, 0.0, 10.0, 10.0)]
    second = [_result(s, wrong + [s.objs[s.phrases[0].box_ids[0]].box], [0, 0], [0.9, 0.5]) for s in samples]
    r = recall_at_k(second, samples)
    assert r["R@1"] == 0.0 and r["R@5"] == 1.0 and r["n_phrases"] == 3


def test_eval_runs_on_a_tiny_split():
    from glip.config import get_preset
    from glip.model import GLIP

    torch.manual_seed(0)
    model = GLIP(get_preset("toy").replace(min_size_test=128, max_size_test=128, num_dyhead_blocks=1)).eval()
    out = evaluate(model, "all", n=2, seed=9, batch_size=2, progress=False)
    assert set(out) == {"test_det", "test_ground", "test_novel"}
    assert {"AP", "AP50", "n_images"} <= set(out["test_det"])
    for sp in ("test_ground", "test_novel"):
        assert {"R@1", "R@5", "n_phrases"} <= set(out[sp])
        assert 0.0 <= out[sp]["R@1"] <= out[sp]["R@5"] <= 1.0
    assert model.config.inference_th == 0.05  # restored after evaluation
    with pytest.raises(ValueError):
        evaluate_grounding(model, "test_det", n=1)
    assert evaluate_detection(model, n=1, seed=9, progress=False)["n_images"] == 1


def test_novel_by_word_partitions_the_target_hits():
    from glip.config import get_preset
    from glip.data import NOVEL_WORDS, make_sample
    from glip.model import GLIP
    from glip.train.report import novel_by_word, prompt_engineering, target_hits

    torch.manual_seed(0)
    model = GLIP(get_preset("toy").replace(min_size_test=128, max_size_test=128, num_dyhead_blocks=1)).eval()
    samples = [make_sample("test_novel", i, 9) for i in range(6)]
    hits = target_hits(model, samples, "caption (as in test_novel)", batch_size=3)
    by = novel_by_word(model, samples, batch_size=3)
    assert set(by) <= NOVEL_WORDS and sum(e["n"] for e in by.values()) == len(samples)
    assert sum(e["hits"] for e in by.values()) == sum(hits)
    assert all(e["R@1"] == round(e["hits"] / e["n"], 3) for e in by.values())
    assert prompt_engineering(model, samples, batch_size=3)["caption (as in test_novel)"] == sum(hits) / len(samples)


@pytest.mark.parametrize("name", ["toy-teacher", "toy-student"])
def test_shipped_checkpoint_loads_offline(name, monkeypatch):
    if name not in shipped_models():
        pytest.skip(f"assets/{name} not present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from glip.model import GLIP

    m = GLIP.from_pretrained(name)
    assert m.config.text_encoder == "all-MiniLM-L6-v2"
    size = sum(p.stat().st_size for p in shipped_models()[name].iterdir())
    assert size <= 25 * 2**20
    r = m.predict(make_split("test_det", 1, seed=2)[0].image, "red circle. blue star", threshold=0.0)
    assert len(r) > 0


@pytest.mark.parametrize("name", ["toy-teacher", "toy-student"])
def test_shipped_models_ground_fresh_scenes(name):
    """Fast smoke version of the slow target test: on 12 fresh-seed test_ground scenes nearly every
    phrase's object is among the model's 5 best boxes (measured R@5 = 1.00 on 200 scenes) and the best
    box is right far more often than a random pick among the scene's objects (~0.25)."""
    if name not in shipped_models():
        pytest.skip(f"assets/{name} not present")
    from glip.model import GLIP

    torch.set_num_threads(2)
    g = evaluate_grounding(GLIP.from_pretrained(name), "test_ground", n=12, seed=777, progress=False)
    assert g["R@5"] >= 0.9
    assert g["R@1"] >= 0.5


@pytest.mark.slow
def test_shipped_models_meet_targets():
    """Targets of issue 3 on a small fresh-seed split (n=60): ~30 s on 2 idle CPU cores (all met since session 6)."""
    from glip.model import GLIP

    have = shipped_models()
    if "toy-teacher" not in have or "toy-student" not in have:
        pytest.skip("shipped models absent")
    torch.set_num_threads(2)
    res = {}
    for name in ("toy-teacher", "toy-student"):
        res[name] = evaluate(GLIP.from_pretrained(name), "all", n=60, seed=777, progress=False)
    t, s = res["toy-teacher"], res["toy-student"]
    for m in (t, s):
        assert m["test_det"]["AP50"] >= 0.90
        assert m["test_ground"]["R@1"] >= 0.90
    assert s["test_novel"]["R@1"] >= 0.80
    assert s["test_novel"]["R@1"] >= t["test_novel"]["R@1"] + 0.30


def test_report_measures_every_round_and_keeps_rows_per_model(tmp_path):
    """`python -m glip.train.report` end to end on micro models: teacher, shipped student and the earlier
    rounds are all measured (an absent round is skipped), every pseudo-label file is swept, the prompt table
    has a column per model."""
    import json

    from glip.config import get_preset
    from glip.data import make_sample, odvg_record, to_odvg
    from glip.model import GLIP
    from glip.train.report import main

    cfg = get_preset("toy").replace(min_size_test=128, max_size_test=128, num_dyhead_blocks=1)
    for k, name in enumerate(("t", "s1", "s2", "s3")):
        torch.manual_seed(k)
        GLIP(cfg).save_pretrained(tmp_path / name / "model")
    for name in ("p1", "p2", "p3"):
        recs = [odvg_record(s, scores=[0.8] * sum(len(p.box_ids) for p in s.phrases))
                for s in (make_sample("web", i, 0) for i in range(3))]
        to_odvg(recs, tmp_path / f"{name}.jsonl")
    out = tmp_path / "metrics.json"
    main(["--teacher", str(tmp_path / "t/model"), "--student", str(tmp_path / "s3/model"),
          "--rounds", str(tmp_path / "s1/model"), str(tmp_path / "s2/model"), str(tmp_path / "absent/model"),
          "--teacher-run", str(tmp_path / "t"), "--student-run", str(tmp_path / "s3"),
          "--pseudo", *(str(tmp_path / f"p{k}.jsonl") for k in (1, 2, 3)), "--n", "2", "--n-prompt", "2",
          "--skip", "latency", "--out", str(out)])
    rep = json.loads(out.read_text())
    roles = ("teacher", "student", "student_round1", "student_round2")
    for role in roles:
        assert {"test_det", "test_ground", "test_novel"} <= set(rep[role]["metrics"])
        assert role in rep["novel_by_word"]
    assert "student_round3" not in rep
    assert rep["student_round2"]["model"] == str(tmp_path / "s2/model")
    for key in ("pseudo_labels", "pseudo_labels_round2", "pseudo_labels_round3"):
        assert rep[key]["sweep"][0]["precision"] == 1.0
    assert all(set(roles) <= set(r) for r in rep["prompt_engineering"]["rows"])
