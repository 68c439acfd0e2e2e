"""The experiment end to end on the smoke preset: files, schema, reruns, and refusals."""

import json
import logging

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from helpers import read_csv
from melano import classifier, pipeline


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = pipeline.PipelineConfig(**{**pipeline.PRESETS["smoke"], "preset": "smoke", "out": str(out)})
    return cfg, pipeline.run(cfg), out


def test_smoke_outputs_and_schema(smoke):
    cfg, result, out = smoke
    for name in ("metrics.json", "report.md", "roc.png", "gan_losses.png", "synthetic_samples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == result
    assert [a["name"] for a in result["arms"]] == list(pipeline.ARMS)
    for a in result["arms"]:
        assert set(a) >= {"name", "test_auc", "ci_low", "ci_high", "p_value_vs_traditional"}
        assert 0 <= a["ci_low"] <= a["test_auc"] <= a["ci_high"] <= 1
        assert (a["p_value_vs_traditional"] is None) == (a["name"] == "traditional")
        # The reported AUC is the AUC of the arm's own saved test predictions.
        rows = read_csv(out / f"arm_{a['name']}" / "test_predictions.csv")
        y = [int(r["target"]) for r in rows]
        p = [float(r["probability"]) for r in rows]
        assert a["test_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert len(rows) == result["split_sizes"]["test"]["images"]
    assert all(result["leakage_guards"].values()) and len(result["leakage_guards"]) == 3
    assert "no validation or test image touches GAN training" in result["leakage_guards"]
    assert set(result["timings_s"]) >= set(pipeline.STAGES) - {"report"}
    md = (out / "report.md").read_text()
    assert "| cyclegan_ls |" in md and "Leakage guards" in md
    assert Image.open(out / "roc.png").size[0] > 100


def test_synthetic_images_balance_training_and_come_from_train_benign(smoke):
    cfg, result, out = smoke
    train = result["split_sizes"]["train"]
    split = {r["image_name"]: r for r in read_csv(out / "data" / "splits.csv")}
    for folder in ("synth", "synth_ls"):
        rows = read_csv(out / folder / "train.csv")
        assert len(rows) == train["images"] - 2 * train["malignant"]  # ratio 1: balanced
        for r in rows:
            src = split[r["source_image"]]
            assert (src["split"], src["target"], r["target"]) == ("train", "0", "1")


def test_rerun_skips_every_stage(smoke, caplog):
    cfg, result, out = smoke
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    with caplog.at_level(logging.INFO, logger="melano.pipeline"):
        again = pipeline.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")} == mtimes
    assert caplog.text.count("skipped") == len(pipeline.STAGES)
    assert again["arms"] == result["arms"]


def test_force_reruns_one_stage(smoke):
    cfg, result, out = smoke
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    pipeline.run(pipeline.PipelineConfig(**{**vars(cfg), "force": ["report"]}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    assert [s for s in after if after[s] != before[s]] == ["report"]


def test_predict_matches_test_predictions(smoke):
    cfg, result, out = smoke
    rows = read_csv(out / "arm_traditional" / "test_predictions.csv")[:3]
    img_dir = out / "data" / "synthetic" / "jpeg" / "train"
    got = classifier.predict(out / "arm_traditional" / "best.pt",
                             [img_dir / f"{r['image_name']}.jpg" for r in rows])
    probs = [p for _, p in got]
    np.testing.assert_allclose(probs, [float(r["probability"]) for r in rows], atol=1e-4)


def test_bad_data_folder_fails_clearly(tmp_path, caplog):
    missing = tmp_path / "nope"
    assert pipeline.main(["--preset", "smoke", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in caplog.text and "no such folder" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pipeline.main(["--preset", "smoke", "--data", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert str(empty) in caplog.text


def test_unknown_stage_and_missing_baseline_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.run(pipeline.PipelineConfig(out=str(tmp_path), force=["gan2"]))
    with pytest.raises(ValueError, match="baseline"):
        pipeline.run(pipeline.PipelineConfig(out=str(tmp_path), arms=["none", "cyclegan"]))


def test_force_reruns_a_stage_and_everything_downstream(smoke):
    cfg, result, out = smoke
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    pipeline.run(pipeline.PipelineConfig(**{**vars(cfg), "force": ["gan"]}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    assert sorted(s for s in after if after[s] != before[s]) == ["arm_cyclegan", "gan", "report", "synth"]


def test_given_weights_are_used_by_every_arm(tmp_path):
    from melano.efficientnet import offline_weights

    cfg = pipeline.PipelineConfig(**{**pipeline.PRESETS["smoke"], "preset": "smoke", "out": str(tmp_path),
                                     "arms": ["none", "traditional"], "weights": offline_weights(
                                         "tf_efficientnet_lite0")})
    result = pipeline.run(cfg)
    assert [a["name"] for a in result["arms"]] == ["none", "traditional"]
    assert json.loads((tmp_path / "arm_none" / "config.json").read_text())["weights"] == cfg.weights


def test_unavailable_weights_fail_before_any_gan_training(tmp_path):
    cfg = pipeline.PipelineConfig(**{**pipeline.PRESETS["smoke"], "preset": "smoke", "out": str(tmp_path),
                                     "arch": "efficientnet_b0"})
    with pytest.raises(ValueError, match="no offline pretrained weights"):
        pipeline.run(cfg)
    assert not (tmp_path / "gan").exists()
