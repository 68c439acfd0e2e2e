"""The experiment end to end on the smoke preset: files, schema, reruns, and refusals."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from helpers import kaggle_to_archive, read_csv
from melano import classifier, pipeline


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = pipeline.make_config("smoke", out=str(out))
    return cfg, pipeline.run_experiment(cfg), out


def test_smoke_outputs_and_schema(smoke):
    cfg, result, out = smoke
    for name in ("metrics.json", "report.md", "roc.png", "gan_losses.png", "synthetic_samples.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == result
    assert [a["name"] for a in result["arms"]] == list(pipeline.ARMS)
    for a in result["arms"]:
        assert set(a) >= {"name", "steps", "images_seen", "seeds", "auc_mean", "auc_sd"}
        assert len(a["seeds"]) == cfg.seeds == 2
        aucs = []
        for k, s in enumerate(a["seeds"]):
            assert 0 <= s["ci_low"] <= s["auc"] <= s["ci_high"] <= 1
            # The reported AUC is the AUC of that seed's own saved test predictions.
            rows = read_csv(out / f"arm_{a['name']}_{k}" / "test_predictions.csv")
            aucs.append(roc_auc_score([int(r["target"]) for r in rows], [float(r["probability"]) for r in rows]))
            assert s["auc"] == pytest.approx(aucs[-1], abs=1e-12)
            assert len(rows) == result["split_sizes"]["test"]["images"]
        assert a["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert all(result["leakage_guards"].values()) and len(result["leakage_guards"]) == 4
    assert "no validation or test image touches GAN training" in result["leakage_guards"]
    assert set(result["timings_s"]) >= set(pipeline.stage_names(cfg)) - {"report"}
    md = (out / "report.md").read_text()
    assert "| cyclegan_ls |" in md and "Leakage guards" in md and "Holm" in md
    assert "second clinic" in md and "other GAN runs" in md
    assert Image.open(out / "roc.png").size[0] > 100


def test_the_experiment_on_an_isic_archive_folder_equals_the_kaggle_layout_run(smoke, tmp_path):
    # the smoke run's data as `isic image download` writes it: the same split, GAN run, classifiers
    # and numbers (one seed, two arms, the primary comparison; the test-only interval: one seed)
    cfg, result, out = smoke
    archive = kaggle_to_archive(out / "data" / "synthetic", tmp_path / "archive")
    arms = ["oversample", "cyclegan"]
    again = pipeline.run_experiment(pipeline.make_config("smoke", data=str(archive), out=str(tmp_path / "run"),
                                                         seeds=1, arms=arms))
    assert read_csv(tmp_path / "run" / "data" / "splits.csv") == read_csv(out / "data" / "splits.csv")
    for a, b in zip(again["arms"], [a for a in result["arms"] if a["name"] in arms]):
        assert a["seeds"][0]["auc"] == pytest.approx(b["seeds"][0]["auc"], abs=1e-12), a["name"]
        rows = read_csv(tmp_path / "run" / f"arm_{a['name']}_0" / "test_predictions.csv")
        assert rows == read_csv(out / f"arm_{a['name']}_0" / "test_predictions.csv")
    (c,) = again["comparisons"]
    assert (c["a"], c["b"], c["role"]) == ("cyclegan", "oversample", "primary") and again["ood"] is None


def test_every_arm_and_seed_is_scored_on_the_second_clinic(smoke):
    cfg, result, out = smoke
    patients = {r["image_name"]: r["patient_id"] for r in read_csv(out / "ood_data" / "patients.csv")}
    home = read_csv(out / "data" / "synthetic" / "train.csv")
    assert len(patients) == cfg.synth_ood_images and not set(patients) & {r["image_name"] for r in home}
    assert not set(patients.values()) & {r["patient_id"] for r in home}
    assert [a["name"] for a in result["ood"]["arms"]] == list(pipeline.ARMS)
    for a in result["ood"]["arms"]:
        assert len(a["seeds"]) == cfg.seeds and a["n_test"] == cfg.synth_ood_images
        for k, s in enumerate(a["seeds"]):
            rows = read_csv(out / "ood_scores" / f"arm_{a['name']}_{k}.csv")
            assert {r["image_name"] for r in rows} == set(patients)
            auc = roc_auc_score([int(r["target"]) for r in rows], [float(r["probability"]) for r in rows])
            assert s["auc"] == pytest.approx(auc, abs=1e-12)
            assert ("gan_run" in s) == (a["name"] in pipeline.GAN_ARMS)


def test_each_cyclegan_seed_reads_its_own_gan_run(smoke):
    cfg, result, out = smoke
    for arm, (gan, synth, _) in pipeline.GAN_ARMS.items():
        seeds = next(a for a in result["arms"] if a["name"] == arm)["seeds"]
        weights, images = [], []
        for k in range(cfg.seeds):
            assert seeds[k]["gan_run"] == f"{gan}_{k}"
            extra = json.loads((out / f"arm_{arm}_{k}" / "config.json").read_text())["extra"]
            assert [str(p) for p in map(Path, extra)] == [str(out / f"{synth}_{k}" / "images")]
            gan_cfg = json.loads((out / f"{gan}_{k}" / "config.json").read_text())
            assert gan_cfg["seed"] == cfg.seed + k
            state = torch.load(out / f"{gan}_{k}" / "checkpoint.pt", weights_only=True)
            weights.append(torch.cat([w.float().flatten() for w in state["G_A"].values()]))
            images.append(sorted((out / f"{synth}_{k}" / "images" / "jpeg" / "train").iterdir())[0].read_bytes())
        # the K GAN runs differ: in their weights and in the images they made from the same source
        assert all(not torch.equal(weights[0], w) for w in weights[1:])
        assert all(images[0] != b for b in images[1:])


def test_every_arm_trains_the_same_steps(smoke):
    # From the arms' own training histories: the same number of optimiser steps, validated at the
    # same steps, with the same batch size; so the same images seen.
    cfg, result, out = smoke
    steps, batches, validated = set(), set(), set()
    for a in result["arms"]:
        for k in range(cfg.seeds):
            arm = out / f"arm_{a['name']}_{k}"
            history = read_csv(arm / "history.csv")
            steps.add(int(history[-1]["step"]))
            validated.add(tuple(int(h["step"]) for h in history))
            batches.add(json.loads((arm / "config.json").read_text())["global_batch_size"])
    train = result["split_sizes"]["train"]["images"]
    assert steps == {cfg.clf.epochs * (train // cfg.clf.batch_size)} and len(validated) == len(batches) == 1
    assert {a["steps"] for a in result["arms"]} == steps
    assert {a["images_seen"] for a in result["arms"]} == {steps.pop() * batches.pop()}


def test_declared_comparisons_are_holm_adjusted_over_both_test_sets(smoke):
    cfg, result, out = smoke
    comps = result["comparisons"]
    declared = [("cyclegan", "oversample", "primary"), ("cyclegan", "traditional", "secondary"),
                ("cyclegan_ls", "cyclegan", "secondary")]
    assert [(c["test_set"], c["a"], c["b"], c["role"]) for c in comps] == [
        (s, *d) for s in ("test", "ood") for d in declared]
    # Holm by hand over the family of 6: sort the p-values, multiply the i-th smallest by (m - i),
    # keep it monotone, cap at 1
    p, m = [c["p"] for c in comps], len(comps)
    order = sorted(range(m), key=lambda i: p[i])
    want, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        want[i] = running
    assert [c["p_holm"] for c in comps] == pytest.approx(want, abs=1e-12)


def test_oversample_arm_resamples_real_training_melanomas(smoke):
    cfg, result, out = smoke
    train = result["split_sizes"]["train"]
    n = train["images"] - 2 * train["malignant"]
    for k in range(cfg.seeds):
        c = json.loads((out / f"arm_oversample_{k}" / "config.json").read_text())
        assert c["oversample"] == n and c["augment"] == "traditional" and c["extra"] == []
        r = json.loads((out / f"arm_oversample_{k}" / "result.json").read_text())
        assert r["extra_images"] == n and r["train_images"] == train["images"]


def test_synthetic_images_balance_training_and_come_from_train_benign(smoke):
    cfg, result, out = smoke
    train = result["split_sizes"]["train"]
    split = {r["image_name"]: r for r in read_csv(out / "data" / "splits.csv")}
    for folder in [f"{s}_{k}" for s in ("synth", "synth_ls") for k in range(cfg.seeds)]:
        rows = read_csv(out / folder / "images" / "train.csv")
        assert len(rows) == train["images"] - 2 * train["malignant"]  # ratio 1: balanced
        for r in rows:
            src = split[r["source_image"]]
            assert (src["split"], src["target"], r["target"]) == ("train", "0", "1")


def test_rerun_skips_every_stage(smoke, caplog):
    cfg, result, out = smoke
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    with caplog.at_level(logging.INFO, logger="melano.pipeline"):
        again = pipeline.run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")} == mtimes
    assert caplog.text.count("skipped") == len(pipeline.stage_names(cfg))
    assert again["arms"] == result["arms"]


def test_rerun_one_stage(smoke):
    cfg, result, out = smoke
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    pipeline.run_experiment(pipeline.PipelineConfig(**{**vars(cfg), "rerun": ["report"]}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    assert [s for s in after if after[s] != before[s]] == ["report"]


def test_predict_matches_test_predictions(smoke):
    cfg, result, out = smoke
    rows = read_csv(out / "arm_traditional_0" / "test_predictions.csv")[:3]
    img_dir = out / "data" / "synthetic" / "jpeg" / "train"
    got = classifier.predict(out / "arm_traditional_0" / "best.pt",
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


def test_unknown_stage_and_arm_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.run_experiment(pipeline.PipelineConfig(out=str(tmp_path), rerun=["gan2"]))
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.run_experiment(pipeline.PipelineConfig(out=str(tmp_path), rerun=["gan_7"]))
    with pytest.raises(ValueError, match="--arms"):
        pipeline.run_experiment(pipeline.PipelineConfig(out=str(tmp_path), arms=["none", "gan"]))
    assert not any(tmp_path.iterdir())  # a refused command changes nothing


def test_rerun_a_stage_and_everything_downstream(smoke):
    cfg, result, out = smoke
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    pipeline.run_experiment(pipeline.PipelineConfig(**{**vars(cfg), "rerun": ["gan_1"]}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    assert sorted(s for s in after if after[s] != before[s]) == ["arm_cyclegan_1", "gan_1", "ood_scores",
                                                                   "quality", "report", "synth_1"]


def test_given_weights_are_used_by_every_arm(tmp_path):
    from melano.pretrained import offline_weights

    cfg = pipeline.make_config("smoke", out=str(tmp_path), arms=["none", "traditional"], seeds=1,
                               weights=offline_weights("tf_efficientnet_lite0"))
    result = pipeline.run_experiment(cfg)
    assert [a["name"] for a in result["arms"]] == ["none", "traditional"]
    assert json.loads((tmp_path / "arm_none_0" / "config.json").read_text())["weights"] == cfg.clf.weights


def test_unavailable_weights_fail_before_any_gan_training(tmp_path):
    cfg = pipeline.make_config("smoke", out=str(tmp_path), arch="efficientnet_b0")
    with pytest.raises(ValueError, match="no pretrained weights for it ship offline.*--no-pretrained"):
        pipeline.run_experiment(cfg)
    assert not (tmp_path / "gan_0").exists()


def test_study_preset_prints_its_configuration_and_deviations(capsys):
    assert pipeline.main(["--preset", "study", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(out[:out.index("Deviations")])
    assert (cfg["gan_size"], cfg["gan_batch_size"], cfg["gan_epochs"] + cfg["gan_epochs_decay"]) == (224, 10, 360)
    assert (cfg["gan_lambda_identity"], cfg["gan_pool_size"], cfg["gan_init"]) == (0.0, 0, "default")
    assert (cfg["arch"], cfg["clf_lr"], cfg["clf_optimizer"], cfg["clf_schedule"]) == (
        "tf_efficientnet_b4", 1e-4, "adam", "constant")
    assert cfg["clf_mean_std"] == "half" and cfg["clf_epochs"] == 10
    assert "lowest" in out and "per-batch" in out and "patient-grouped" in out
    # flags still win over the preset
    assert pipeline.main(["--preset", "study", "--gan-batch-size", "4", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.split("Deviations")[0])["gan_batch_size"] == 4


def test_gan_layout_per_preset():
    """channels_last where bench_cyclegan measured it faster (the quick GAN on a CPU); NCHW in the
    GPU presets, where nothing has measured it yet."""
    layout = {p: pipeline.make_config(p).gan.channels_last for p in pipeline.PRESETS}
    assert layout == {"smoke": True, "quick": True, "full": False, "study": False}


def test_the_trainers_settings_reach_their_configs_under_every_spelling():
    # --gan-*/--clf-* are the trainers' own fields: every one reaches each GAN's and arm's config as
    # given; the flags' spellings from before the composition set the same fields; errors name the flag
    import dataclasses
    from pathlib import Path
    d = {"data": "d", "split_csv": "s.csv", "split_sizes": {"train": {"images": 100, "malignant": 10}}}
    for preset in pipeline.PRESETS:
        cfg = pipeline.make_config(preset)
        for smoothing in ("none", "noisy"):
            gan = dataclasses.asdict(pipeline.gan_config(cfg, d, Path("c"), smoothing, 0))
            assert dataclasses.asdict(cfg.gan).items() <= gan.items()
            assert gan["gen_act"] == (cfg.gan_ls_gen_act if smoothing == "noisy" else "relu")
        for arm in pipeline.ARMS:
            clf = dataclasses.asdict(pipeline.arm_config(cfg, d, Path("c"), arm, 1, [], 0))
            assert dataclasses.asdict(cfg.clf).items() <= clf.items() and clf["seed"] == cfg.seed + 1
    # one --negatives for both trainers (the GANs' domain A and the classifiers' negatives)
    cfg = pipeline.parse_config(["--negatives", "nevi"])[0]
    assert pipeline.gan_config(cfg, d, Path("c"), "none", 2).negatives == "nevi"
    assert pipeline.arm_config(cfg, d, Path("c"), "none", 0, [], 0).negatives == "nevi"
    with pytest.raises(SystemExit):
        pipeline.parse_config(["--negatives", "moles"])
    old = ["--gan-blocks", "2", "--arch", "tf_efficientnet_b0", "--no-pretrained", "--clf-size", "none"]
    new = ["--gan-n-blocks", "2", "--clf-arch", "tf_efficientnet_b0", "--no-clf-pretrained", "--clf-size", "none"]
    cfg = pipeline.parse_config(old)[0]
    assert cfg == pipeline.parse_config(new)[0] == pipeline.make_config(
        "quick", gan_blocks=2, arch="tf_efficientnet_b0", pretrained=False, clf_size=None)
    assert (cfg.gan.n_blocks, cfg.clf.arch, cfg.clf.pretrained, cfg.clf.size) == (2, "tf_efficientnet_b0", False, None)
    flat = cfg.flat()  # what --dry-run and config.json show: the flags' names, the old spellings kept
    assert (flat["gan_blocks"], flat["arch"], flat["pretrained"], flat["gan_size"]) == (2, "tf_efficientnet_b0", False, 48)
    assert pipeline.make_config(**flat) == cfg
    with pytest.raises(ValueError, match="^--clf-warmup must be <= 0.99"):
        pipeline.make_config("smoke", clf_warmup=1.5)


def test_stages_run_side_by_side_in_order_and_stop_at_a_failure(tmp_path):
    import threading
    import time
    from melano.infra import outdir
    stages, seen = pipeline.Stages(tmp_path, outdir.claim(tmp_path, "pipeline"), []), []
    started = threading.Barrier(2, timeout=10)

    def job(i, folder, resume):
        if i < 2:
            started.wait()  # the first two run at the same time, or this times out
        time.sleep(0.1 if i == 0 else 0.0)  # and the first finishes last
        seen.append(i)
        return {"i": i}

    todo = [(f"s{i}", {"i": i}, lambda f, r, i=i: job(i, f, r)) for i in range(4)]
    assert [r["i"] for r in stages.run_all(todo, jobs=2)] == [0, 1, 2, 3]
    assert sorted(seen) == [0, 1, 2, 3] and seen.index(1) < seen.index(0)  # results keep their order

    def fails(folder, resume):
        raise ValueError("boom")
    seen.clear()
    todo = [("f0", {}, fails)] + [(f"t{i}", {"i": i}, lambda f, r, i=i: job(9, f, r)) for i in range(6)]
    with pytest.raises(ValueError, match="boom"):
        stages.run_all(todo, jobs=2)
    assert len(seen) < 6  # the stages not yet started were cancelled
    assert not (tmp_path / "f0" / "done.json").exists()


def test_stages_in_this_process_take_one_jobs_share_of_the_cores(tmp_path, monkeypatch):
    """Beside the trainers' processes, a stage that runs in the pipeline's own process (quality,
    translations) uses cores / jobs torch threads, and the process's setting comes back after."""
    import os
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        seen = pipeline.Stages.side_by_side([lambda futures: torch.get_num_threads()] * 3, jobs=2)
        assert seen == [2, 2, 2] and torch.get_num_threads() == 3
        assert pipeline.Stages.side_by_side([lambda futures: torch.get_num_threads()], jobs=1) == [3]
    finally:
        torch.set_num_threads(before)


def test_a_failing_child_stage_names_its_log(tmp_path):
    cfg = classifier.ClassifierConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "arm"), pretrained=False,
                                      size=32, max_steps=1)
    (tmp_path / "arm").mkdir()
    with pytest.raises(RuntimeError, match=r"exited with code 2 .*train\.log.*missing"):
        pipeline.train_process("melano.classifier", cfg, 1, 1, tmp_path / "arm")


def test_smoke_training_stages_ran_in_child_processes_on_a_cpu(smoke):
    cfg, _, out = smoke
    if pipeline.default_jobs(None) == 1:
        pytest.skip("one core: the stages train in the pipeline's process")
    for name in ("gan_0", "gan_ls_1", "arm_none_0", "arm_cyclegan_1"):
        log = (out / name / "train.log").read_text()
        assert "train" in log and "Traceback" not in log


def test_a_stopped_child_stage_stops_the_pipeline_as_a_signal(tmp_path, monkeypatch):
    # a trainer stopped by SIGINT exits 130 after saving: the pipeline stops the same way (exit 130),
    # so that a rerun resumes the stage rather than reporting a failure
    import subprocess
    import sys
    from melano.infra import signals
    real = subprocess.Popen
    child = [sys.executable, "-c", "import sys; print('stopped by SIGINT'); sys.exit(130)"]
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: real(child, **kw))
    cfg = classifier.ClassifierConfig(data="d", out=str(tmp_path / "arm"), pretrained=False, size=32)
    (tmp_path / "arm").mkdir()
    with pytest.raises(signals.Stopped) as stopped:
        pipeline.train_process("melano.classifier", cfg, 1, 1, tmp_path / "arm")
    assert stopped.value.exit_code == 130
    assert "stopped by SIGINT" in (tmp_path / "arm" / "train.log").read_text()
