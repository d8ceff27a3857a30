"""Training modes on a trained base model: full (separate language LR), prompt tuning (only the prompt
embedding changes; the saved prompt reloads onto its base and reproduces the outputs), linear probe (only
its parameters change). Frozen weights are compared bit for bit."""
import json
from pathlib import Path

import pytest
import torch

from glip.errors import CheckpointError, ConfigError
from glip.model import GLIP
from glip.train.trainer import LINEAR_PROBE, build_model, compute_loss, get_config, make_stream, param_groups, train

MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)
REPO = Path(__file__).resolve().parents[1]
FIXED = ("world:gold_ground:0:2",)  # two captioned scenes, no flips: every step sees the same items


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small trained-from-scratch model saved in our format: the base that the modes start from."""
    out = tmp_path_factory.mktemp("base")
    tc = get_config("tiny", model_overrides=MICRO, out=str(out), steps=2, batch_size=2, device="cpu",
                    data=("world:gold_det:0:8:0.5", "world:gold_ground:0:8:0.5"), max_minutes=1e6)
    train(tc, progress_bar=False, quiet=True)
    return out / "model"


def run(tmp_path, base, mode, **kw):
    args = dict(model_overrides=MICRO, out=str(tmp_path / mode), init_from=str(base), mode=mode, steps=6,
                batch_size=2, device="cpu", data=FIXED, flip_prob=0.0, max_minutes=1e6, warmup_steps=0,
                min_lr_ratio=1.0, ema=0.0)
    args.update(kw)
    tc = get_config("tiny", **args)
    return tc, train(tc, progress_bar=False, quiet=True)


def fixed_batch(tc, cfg):
    return make_stream(tc, cfg)[0][0]


def test_prompt_tuning_changes_only_the_prompt_lowers_the_loss_and_reloads(tmp_path, base):
    tc, r = run(tmp_path, base, "prompt", lr=0.05, weight_decay=0.25, steps=20)
    folder = tmp_path / "prompt" / "prompt"
    assert r["saved"] == str(folder) and not (tmp_path / "prompt" / "model").exists()
    assert (folder / "prompt.safetensors").stat().st_size < 200_000  # (128, 384) fp32: a small file
    card = json.loads((folder / "prompt.json").read_text())
    assert card["base_model"] == str(base) and card["training"]["mode"] == "prompt"

    ref = GLIP.from_pretrained(str(base), device="cpu")
    tuned = r["model"]
    # the whole base model stays bit-identical; only tunable_linear moved
    sd_ref, sd_tuned = ref.state_dict(), tuned.state_dict()
    assert set(sd_tuned) - set(sd_ref) == {"tunable_linear.weight"}
    for k, v in sd_ref.items():
        assert torch.equal(v, sd_tuned[k]), k
    assert float(tuned.tunable_linear.weight.detach().abs().max()) > 1e-3

    # the loss on the (fixed) training items fell
    batch = fixed_batch(tc, ref.config)
    with torch.no_grad():
        before = float(compute_loss(ref.train(), batch, True, tc.contrastive_weight).total)
        after = float(compute_loss(tuned.train(), batch, True, tc.contrastive_weight).total)
    assert after < 0.9 * before, (before, after)

    # the saved prompt loads onto its base (by folder) and reproduces the tuned model's outputs
    loaded = GLIP.from_pretrained(str(folder), device="cpu").eval()
    tuned.eval()
    with torch.no_grad():
        out_a = tuned(batch["images"], batch["input_ids"], batch["attention_mask"]).head.token_logits
        out_b = loaded(batch["images"], batch["input_ids"], batch["attention_mask"]).head.token_logits
        out_r = ref.eval()(batch["images"], batch["input_ids"], batch["attention_mask"]).head.token_logits
    for a, b, c in zip(out_a, out_b, out_r):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())  # a float rounding at most
        assert not torch.allclose(a, c, atol=1e-3)  # the prompt does change the outputs
    # predict goes through the same path
    from PIL import Image

    img = Image.new("RGB", (128, 128), (200, 30, 30))
    pa, pb = tuned.predict(img, "red circle", threshold=0.0), loaded.predict(img, "red circle", threshold=0.0)
    assert torch.allclose(torch.as_tensor(pa.scores), torch.as_tensor(pb.scores))


def test_a_zero_prompt_changes_nothing_and_a_prompt_refuses_another_base(tmp_path, base):
    from glip.prompt_tuning import attach_prompt, load_prompt, save_prompt

    m = GLIP.from_pretrained(str(base), device="cpu").eval()
    tc = get_config("tiny", model_overrides=MICRO, data=FIXED, flip_prob=0.0)
    batch = fixed_batch(tc, m.config)
    with torch.no_grad():
        plain = m(batch["images"], batch["input_ids"], batch["attention_mask"]).head.token_logits
        attach_prompt(m)
        zero = m(batch["images"], batch["input_ids"], batch["attention_mask"]).head.token_logits
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    save_prompt(m, tmp_path / "p", base=str(base))
    other = GLIP.from_pretrained(str(base), device="cpu")
    with torch.no_grad():
        other.rpn.head.bias0.add_(1.0)
    with pytest.raises(CheckpointError, match="tuned on"):
        load_prompt(other, tmp_path / "p")


def test_linear_probe_touches_only_its_parameters(tmp_path, base):
    tc, r = run(tmp_path, base, "linear", lr=1e-2)
    ref = GLIP.from_pretrained(str(base), device="cpu").state_dict()
    got = GLIP.from_pretrained(str(tmp_path / "linear" / "model"), device="cpu").state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], got[k])}
    assert changed and all(k.startswith(LINEAR_PROBE) for k in changed), sorted(changed)
    # every probed tensor moved except, possibly, log_scale (one scalar)
    probed = {k for k in ref if k.startswith(LINEAR_PROBE)}
    assert probed - changed <= {"rpn.head.log_scale"}
    assert json.loads((tmp_path / "linear" / "model" / "config.json").read_text())["training"]["mode"] == "linear"


def test_full_mode_language_lr_and_bias_groups(tmp_path, base):
    tc = get_config("tiny", model_overrides=MICRO, init_from=str(base), data=FIXED, lr=1e-4, text_lr=1e-5,
                    bias_lr_factor=2.0)
    model = build_model(tc)
    groups = param_groups(model, tc)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        ns = [names[id(p)] for p in g["params"]]
        text = {n.startswith("language_backbone.") for n in ns}
        assert len(text) == 1
        bias = {n.endswith(".bias") for n in ns}
        assert len(bias) == 1
        want = (1e-5 if text.pop() else 1e-4) * (2.0 if bias.pop() else 1.0)
        assert g["lr"] == pytest.approx(want)
    n_text = sum(p.numel() for g in groups for p in g["params"] if names[id(p)].startswith("language_backbone."))
    assert n_text == sum(p.numel() for p in model.language_backbone.parameters())
    # text_lr 0: the language backbone is frozen (not in the optimiser, no gradient)
    frozen = build_model(get_config("tiny", model_overrides=MICRO, init_from=str(base), data=FIXED))
    assert not any(p.requires_grad for p in frozen.language_backbone.parameters())
    assert not frozen.rpn.head.cls_logits.weight.requires_grad  # unused by GLIP's forward


def test_full_fine_tune_keeps_a_frozen_text_encoder_bit_identical(tmp_path, base):
    tc, r = run(tmp_path, base, "full", lr=1e-3, eval_every=6, eval_data=("world:test_ground:5:2",))
    ref = GLIP.from_pretrained(str(base), device="cpu").state_dict()
    got = r["model"].state_dict()
    lang = [k for k in ref if k.startswith("language_backbone.")]
    assert lang and all(torch.equal(ref[k], got[k]) for k in lang)
    assert any(not torch.equal(ref[k], got[k]) for k in ref if k.startswith("backbone."))
    evals = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1 and 0 <= evals[0]["eval"]["world:test_ground:5:2"]["R@1"] <= 1
    card = json.loads((tmp_path / "full" / "model" / "config.json").read_text())["training"]
    assert card["base_model"] == str(base) and card["steps"] == 6 and card["data"] == list(FIXED)


def test_modes_refuse_nonsense(tmp_path, base):
    with pytest.raises(ConfigError, match="init_from"):
        get_config("prompt")  # prompt tuning needs a trained model
    with pytest.raises(ConfigError, match="preset"):
        build_model(get_config("tiny", init_from="glip-t", data=FIXED))  # a preset has random weights
    with pytest.raises(ConfigError, match="mode"):
        get_config("tiny", mode="everything")


def test_fine_tuning_an_official_layout_checkpoint_on_a_coco_split_improves_its_ap(tmp_path):
    """The official-layout GLIP-T (B)/(C)-style checkpoint of tests/fixtures (reduced widths, random weights,
    written by the official code) fine-tuned for 60 steps on an exported 4-image COCO split (read back through
    `coco:`): COCO AP50 on that split rises from its starting value, evaluated the way `python -m glip eval
    --data coco:...` does. Enough steps that the rise does not hang on the last bits of one CPU's float sums."""
    from glip.datasets import write_dataset
    from glip.evaluate import evaluate_dataset

    fx = REPO / "tests" / "fixtures" / "glip-official-tiny"
    cfg = json.loads((fx / "config.json").read_text())
    cfg["config"]["INPUT.MIN_SIZE_TEST"] = cfg["config"]["INPUT.MAX_SIZE_TEST"] = 128  # small inputs: a fast test
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = write_dataset("world:gold_det:3:4", "coco", tmp_path / "coco")["spec"]
    assert spec.startswith("coco:")
    base = GLIP.from_pretrained(str(fx / "model.pth"), config=str(tmp_path / "config.json"), device="cpu")
    before = evaluate_dataset(base, spec, progress=False)
    tc = get_config("finetune", init_from=str(fx / "model.pth"), init_config=str(tmp_path / "config.json"),
                    data=(spec,), steps=60, batch_size=2, lr=1e-3, text_lr=1e-3, warmup_steps=3, ema=0.0, device="cpu",
                    num_workers=0, num_threads=2, out=str(tmp_path / "run"), det_negatives=(2, 4))
    r = train(tc, progress_bar=False, quiet=True)
    tuned = GLIP.from_pretrained(str(tmp_path / "run" / "model"), device="cpu")
    after = evaluate_dataset(tuned, spec, progress=False)
    assert after["AP50"] > before["AP50"] + 0.01, (before["AP50"], after["AP50"])
    assert r["history"][-1]["loss"] < 0.5 * r["history"][0]["loss"]
    card = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["training"]
    assert card["base_model"] == str(fx / "model.pth") and card["data"] == [spec] and card["mode"] == "full"
    # the text encoder was fine-tuned (text_lr > 0), so the saved model carries it
    assert not torch.equal(tuned.language_backbone.body.model.embeddings.word_embeddings.weight,
                           base.language_backbone.body.model.embeddings.word_embeddings.weight)
