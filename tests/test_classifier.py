"""melano.classifier: training, selection on the whole validation set, resume, --extra, evaluate, predict.

Oracles: scikit-learn's roc_auc_score for every AUC, the split written in splits.csv for which images
belong where, torch's own LR schedulers for the warm-up + cosine schedule, and an uninterrupted run
for resume. Everything runs on tiny synthetic data at 32 px so the file stays well under 2 minutes.
"""

import csv
import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import read_csv
from melano import classifier
from melano.classifier import ClassifierConfig, evaluate, predict, train
from melano.schedules import warmup_cosine as lr_factor
from melano.synth import SynthConfig, generate

SIZE = 32


def split_names(split_csv):
    out = {"train": [], "val": [], "test": []}
    for r in read_csv(split_csv):
        out[r["split"]].append(r["image_name"])
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    generate(SynthConfig(out=str(root / "data"), benign=50, malignant=30, size=SIZE, seed=3,
                         images_per_patient=3.0))
    return root


def config(root: Path, out: str, **kw) -> ClassifierConfig:
    base = dict(data=str(root / "data"), out=str(root / out), split_csv=str(root / "splits.csv"),
                cache_dir=str(root / "cache"), size=SIZE, batch_size=8, eval_batch_size=4, max_steps=4,
                val_every=2, pretrained=False, threads=1, workers=0, seed=5)
    base.update(kw)
    return ClassifierConfig(**base)


@pytest.fixture(scope="module")
def run(dataset):
    """One short run with the offline pretrained weights: 4 steps, validation every 2."""
    return train(config(dataset, "run", pretrained=True))


def test_run_writes_checkpoints_predictions_and_consistent_aucs(dataset, run):
    out = Path(run.out)
    for name in ("best.pt", "last.pt", "config.json", "history.csv", "val_predictions.csv",
                 "test_predictions.csv", "test_metrics.json", "result.json"):
        assert (out / name).is_file(), name
    assert run.steps == run.total_steps == 4
    split = split_names(dataset / "splits.csv")

    # Validation: the CSV holds the WHOLE val split (eval batches of 4 images), and the best AUC is
    # sklearn's AUC over all of it, not a mean of per-batch AUCs.
    val = read_csv(out / "val_predictions.csv")
    assert [r["image_name"] for r in val] == split["val"]
    y, p = [int(r["target"]) for r in val], [float(r["probability"]) for r in val]
    assert len(val) > 4 and 0 < sum(y) < len(y)
    assert run.best_val_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    history = read_csv(out / "history.csv")
    assert [int(h["step"]) for h in history] == [2, 4]
    assert max(float(h["val_auc"]) for h in history) == pytest.approx(run.best_val_auc, abs=1e-6)

    # Test: every test image once, labels from the data, AUC = sklearn's on the CSV.
    test = read_csv(out / "test_predictions.csv")
    assert sorted(r["image_name"] for r in test) == sorted(split["test"])
    labels = {r["image_name"]: r["target"] for r in read_csv(dataset / "data" / "train.csv")}
    assert all(r["target"] == labels[r["image_name"]] for r in test)
    auc = roc_auc_score([int(r["target"]) for r in test], [float(r["probability"]) for r in test])
    m = json.loads((out / "test_metrics.json").read_text())
    assert m["auc"] == pytest.approx(auc, abs=1e-12) and run.test["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["ci_low"] < m["auc"] < m["ci_high"] and m["images"] == len(split["test"])

    # Checkpoints are plain data: weights_only loading works and holds what predict needs.
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["format"] == "melano.classifier" and best["arch"] == "tf_efficientnet_lite0"
    assert best["image_size"] == SIZE and best["num_classes"] == 1 and len(best["mean"]) == 3
    assert best["step"] == run.best_step and best["val_auc"] == run.best_val_auc
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["size"] == SIZE and cfg["max_steps"] == 4


def test_lr_schedule_matches_torch_warmup_then_cosine():
    warmup, total = 5, 30
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)], milestones=[warmup])
    for step in range(total):
        assert lr_factor(step, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), step
        opt.step()
        sched.step()
    assert lr_factor(0, 0, 10) == 1.0 and lr_factor(10, 0, 10) == pytest.approx(0.0, abs=1e-12)


def test_resume_after_interrupt_equals_an_uninterrupted_run(dataset, monkeypatch):
    # Interrupted mid-epoch at step 3; the run then crosses an epoch boundary before it ends.
    steps = len(split_names(dataset / "splits.csv")["train"]) // 8 + 2
    assert steps > 4
    full = train(config(dataset, "full", max_steps=steps, val_every=3, evaluate=False, augment="traditional"))

    real_progress = classifier.trainer.progress

    def sigint_at_step_3(iterable, total=None, desc=""):  # SIGINT while step 3 runs, as Ctrl-C would
        for i, item in enumerate(real_progress(iterable, total=total, desc=desc)):
            if i == 2:
                signal.raise_signal(signal.SIGINT)
            yield item

    cfg = config(dataset, "resumed", max_steps=steps, val_every=3, evaluate=False, augment="traditional")
    monkeypatch.setattr(classifier.trainer, "progress", sigint_at_step_3)
    with pytest.raises(KeyboardInterrupt, match="step 3"):
        train(cfg)
    monkeypatch.setattr(classifier.trainer, "progress", real_progress)
    assert torch.load(Path(cfg.out) / "last.pt", weights_only=True)["step"] == 3
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)  # a second run into the same folder must not silently restart
    resumed = train(dataclasses.replace(cfg, resume=True))
    assert resumed.steps == steps == full.steps

    a = torch.load(Path(full.out) / "last.pt", weights_only=True)
    b = torch.load(Path(resumed.out) / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]
    assert (Path(full.out) / "val_predictions.csv").read_text() == \
        (Path(resumed.out) / "val_predictions.csv").read_text()


def write_extra(folder: Path, rows: list[dict], src_dir: Path) -> None:
    """A Kaggle-layout training-only folder like `cyclegan translate` writes (target 1, source_image)."""
    (folder / "jpeg" / "train").mkdir(parents=True)
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image_name", "patient_id", "diagnosis", "target", "source_image"])
        w.writeheader()
        for r in rows:
            w.writerow({"diagnosis": "synthetic", "target": 1, **r})
            (folder / "jpeg" / "train" / f"{r['image_name']}.jpg").write_bytes(
                (src_dir / f"{r['source_image']}.jpg").read_bytes())


def test_extra_images_join_training_only(dataset):
    split = split_names(dataset / "splits.csv")
    src_dir = dataset / "data" / "jpeg" / "train"
    extra = dataset / "extra_ok"
    rows = [{"image_name": f"SYN_{i:04d}", "patient_id": "", "source_image": name}
            for i, name in enumerate(split["train"][:6])]
    write_extra(extra, rows, src_dir)
    cfg = config(dataset, "extra", extra=[str(extra)], max_steps=2, pos_weight="auto", augment="traditional")
    result = train(cfg)
    assert result.train_images == len(split["train"])
    assert result.extra_images == 6
    assert (result.val_images, result.test_images) == (len(split["val"]), len(split["test"]))
    targets = {r["image_name"]: int(r["target"]) for r in read_csv(dataset / "data" / "train.csv")}
    n_pos = sum(targets[n] for n in split["train"]) + 6
    n_neg = len(split["train"]) - (n_pos - 6)
    assert result.pos_weight == pytest.approx(n_neg / n_pos)
    scored = {r["image_name"] for r in read_csv(Path(result.out) / "val_predictions.csv")}
    scored |= {r["image_name"] for r in read_csv(Path(result.out) / "test_predictions.csv")}
    assert scored == set(split["val"]) | set(split["test"])  # no synthetic image was scored


@pytest.mark.parametrize("leak", ["source", "name", "patient"])
def test_extra_derived_from_held_out_images_is_refused(dataset, leak):
    split = split_names(dataset / "splits.csv")
    patient = {r["image_name"]: r["patient_id"] for r in read_csv(dataset / "data" / "train.csv")}
    test_image, train_image = split["test"][0], split["train"][0]
    row = {"source": {"image_name": "SYN_LEAK", "patient_id": "", "source_image": test_image},
           "name": {"image_name": test_image, "patient_id": "", "source_image": train_image},
           "patient": {"image_name": "SYN_LEAK", "patient_id": patient[test_image], "source_image": train_image},
           }[leak]
    extra = dataset / f"extra_leak_{leak}"
    write_extra(extra, [row], dataset / "data" / "jpeg" / "train")
    with pytest.raises(ValueError, match="leak") as e:
        train(config(dataset, f"leak_{leak}", extra=[str(extra)], max_steps=1))
    assert str(extra) in str(e.value)
    assert test_image in str(e.value) or patient[test_image] in str(e.value)
    assert not (dataset / f"leak_{leak}" / "last.pt").exists()


def test_predict_matches_evaluation(dataset, run, tmp_path):
    test = read_csv(Path(run.out) / "test_predictions.csv")[:5]
    files = [dataset / "data" / "jpeg" / "train" / f"{r['image_name']}.jpg" for r in test]
    out_csv = tmp_path / "pred.csv"
    assert classifier.main(["predict", "--checkpoint", run.best_checkpoint, "--images", str(files[0]), "--out",
                            str(out_csv), "--device", "cpu"]) == 0
    assert read_csv(out_csv)[0]["image"] == str(files[0])
    got = predict(run.best_checkpoint, files, batch_size=2)
    assert [Path(n) for n, _ in got] == files
    expected = [float(r["probability"]) for r in test]
    np.testing.assert_allclose([p for _, p in got], expected, atol=1e-5)
    assert float(read_csv(out_csv)[0]["probability"]) == pytest.approx(expected[0], abs=1e-5)

    # A folder: every image in it, sorted; TTA changes the numbers but stays a probability.
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    tta = predict(run.best_checkpoint, folder, tta=True)
    assert [Path(n).name for n, _ in tta] == sorted(f.name for f in files[:3])
    assert all(0 < p < 1 for _, p in tta)


def test_evaluate_with_tta_scores_the_same_test_split(dataset, run, tmp_path):
    r = evaluate(run.best_checkpoint, out_dir=tmp_path, tta=True)
    rows = read_csv(r["predictions"])
    assert sorted(x["image_name"] for x in rows) == sorted(split_names(dataset / "splits.csv")["test"])
    auc = roc_auc_score([int(x["target"]) for x in rows], [float(x["probability"]) for x in rows])
    assert r["auc"] == pytest.approx(auc, abs=1e-12) and r["tta"] is True


def test_tta_views_are_the_flips_and_the_dihedral_group():
    # oracle: torch.rot90 of the image and of its mirror image gives the 8 dihedral views; a
    # model that is not symmetric (a random conv net) gives each a different logit
    from melano.detector import Normalise, infer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    x = torch.rand(5, 3, 7, 7)
    model(x)  # materialise the lazy layer
    norm = Normalise((0.0,) * 3, (1.0,) * 3, channels_last=False)
    batch = [(x, torch.zeros(5))]
    logit = lambda imgs: torch.stack([model(i).squeeze(1) for i in imgs]).mean(0).double().detach().numpy()
    dihedral = [torch.rot90(x, k, (2, 3)) for k in range(4)] + [torch.rot90(x.flip(3), k, (2, 3)) for k in range(4)]
    flips = [x, x.flip(3), x.flip(2), x.flip((2, 3))]
    for tta, imgs in ((False, [x]), (1, [x]), (True, flips), (4, flips), (8, dihedral)):
        np.testing.assert_allclose(infer(model, norm, batch, torch.device("cpu"), tta=tta)[0], logit(imgs), atol=1e-6)
    with torch.no_grad():
        assert len({round(float(model(i)[0, 0]), 6) for i in dihedral}) == 8
    with pytest.raises(ValueError, match="1, 4 or 8 views"):
        infer(model, norm, batch, torch.device("cpu"), tta=3)


def test_bad_inputs_fail_clearly(dataset, tmp_path, caplog):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(config(dataset, "bad", data=str(missing)))
    assert classifier.main(["train", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in caplog.text

    not_ours = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_ours)
    with pytest.raises(ValueError, match="not a melano classifier checkpoint"):
        predict(not_ours, dataset / "data" / "jpeg" / "train")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        predict(garbage, dataset / "data" / "jpeg" / "train")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        evaluate(tmp_path / "missing.pt")

    with pytest.raises(ValueError, match="--pos-weight"):
        train(config(dataset, "bad_pw", pos_weight="lots"))
    with pytest.raises(ValueError, match="unknown EfficientNet"):
        train(config(dataset, "bad_arch", arch="resnet50"))


def test_evaluate_never_draws_a_new_split(dataset, run, tmp_path):
    # Moved data without its splits.csv: a freshly drawn split could hold training images.
    with pytest.raises(FileNotFoundError, match="split this model was trained with"):
        evaluate(run.best_checkpoint, out_dir=tmp_path, split_csv=str(tmp_path / "gone.csv"))
    assert not (tmp_path / "gone.csv").exists()


def test_diverged_training_stops_with_a_clear_error(dataset):
    with pytest.raises(FloatingPointError, match="diverged by step 2"):
        train(config(dataset, "diverged", lr=1e30, max_steps=2, val_every=2))


def test_study_options_constant_lr_and_half_normalisation(dataset):
    assert [lr_factor(s, 0, 10, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 2, 10, "constant") == 0.5  # a warm-up still warms up
    cfg = config(dataset, "study", mean_std="half", optimizer="adam", weight_decay=0.0)
    assert classifier.config.mean_std(cfg) == ((0.5,) * 3, (0.5,) * 3)
    m = classifier.trainer.build_training(cfg, torch.device("cpu"), None)
    assert type(m.opt) is torch.optim.Adam and m.norm.mean.flatten().tolist() == [0.5] * 3


def test_without_split_csv_nothing_is_written_into_data(dataset, tmp_path, monkeypatch):
    # issue 11, bug 2: with no --split-csv the split was written into the --data folder
    data_before = sorted(p.name for p in (dataset / "data").rglob("*"))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", str(dataset / "data"), "--out", "run", "--size", "32", "--batch-size", "8",
            "--max-steps", "1", "--no-pretrained", "--no-evaluate", "--threads", "1", "--workers", "0",
            "--device", "cpu"]
    assert classifier.main(argv) == 0
    assert (tmp_path / "run" / "splits.csv").is_file() and (tmp_path / "run" / "cache").is_dir()
    assert sorted(p.name for p in (dataset / "data").rglob("*")) == data_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
