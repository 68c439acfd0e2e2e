"""The quality stage: how good are each GAN arm's synthetic melanomas? It checks the inputs, samples
the sets to encode (encoding is the stage's cost: each set is a seeded sample of at most
`QualityConfig.max_images` images, real melanomas up to `max_reference`), runs every measure of
`melano.quality` beside its scale references (real vs real, benign vs malignant) and draws the
pictures. Its JSON-able result ("mel" = melanomas):

  encoder, sets       the encoder, and the images in each evaluated set (the sample sizes)
  reference           distances and two-sample AUCs of real_mel_test and real_benign_val vs
                      real_mel_train: the scale of every arm's numbers
  severity_regressor  the ridge regressor's fit, or {"skipped": reason} without severities
  criteria_probe      per criterion (`quality.CRITERIA`) the probe's validation AUC and whether it
                      can see the criterion, or {"skipped": reason} without hidden criteria
  arms[key]           per GAN run (key f"{arm}_g{k}", or just the arm for a single run): distances
                      and two_sample (synthetic and sources vs real_mel_train), translation_success,
                      severity, memorisation, criteria and, with out_dir, pictures (run 0 only)
  runs[arm]           {"runs": its keys, "mean": {...}, "sd": {...}}: each headline figure
                      (`headline`) averaged over the arm's GAN runs, sd over runs (0 for one run)
  timings_s, config   wall and CPU seconds, and the QualityConfig used
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import data, metrics, pretrained, report, synth
from .quality import (CRITERIA, MALIGNANT_STRUCTURES, Encoder, as_nhwc, fit_logistic, fit_probe, fit_ridge,
                      frechet_distance, group_runs, kid, mean_sd_over_runs, memorisation, paired_change,
                      pixel_features, predict, probe_present, r2_score, run_index, sample_sd, seven_point_score,
                      summarise, translation_success, two_sample_auc)

log = logging.getLogger("melano.quality")

ENCODER_NAME = "tf_efficientnet_lite0"
SPLIT_NAMES = ("train", "val", "test")


def imagenet_encoder(weights: str | None = None, resolution: int = 224, batch_size: int = 32,
                     device: str = "cpu") -> Encoder:
    """The packaged ImageNet Lite0 (or the checkpoint `weights`) as an Encoder, at `resolution`
    (224: the weights' native size; smaller images are upsampled)."""
    return Encoder(pretrained.efficientnet(ENCODER_NAME, pretrained=weights or True), resolution, batch_size, device)


def hidden_severity(data_dir) -> dict[str, float] | None:
    """{image_name: severity} from the hidden truth `melano.synth.generate` wrote beside train.csv
    (synth_criteria.csv); None for any other folder (real data has no hidden truth)."""
    truth = synth.read_truth(data_dir)
    return None if truth is None else {name: float(t["s"]) for name, t in truth.items()}


def hidden_criteria(data_dir, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """{criterion: (N,) 0/1 in the order of `names`} for each of `quality.CRITERIA` (multicolour: 3 or
    more colours), from the truth file melano.synth wrote; None for any other folder."""
    truth = synth.read_truth(data_dir)
    if truth is None:
        return None
    missing = [n for n in names if n not in truth]
    if missing:
        raise ValueError(f"{data_dir}: {len(missing)} image(s) are not in {synth.CRITERIA_CSV} (first: "
                         f"{missing[0]!r}); pass the names of this folder's images")
    rows = [truth[n] for n in names]
    out = {c: np.array([int(r[c]) for r in rows]) for c in CRITERIA if c != "multicolour"}
    out["multicolour"] = np.array([int(int(r["n_colours"]) >= 3) for r in rows])
    return out


@dataclasses.dataclass
class QualityConfig:
    max_images: int = 128          # per sampled set: an arm's translations, their sources, each benign set
    max_reference: int = 1000      # real melanomas per split
    max_pixel_images: int = 1000   # per set in the pixel two-sample test (no encoder, but bigger fits)
    pixel_size: int = 16           # pixel two-sample test: pixels and fine detail, area-averaged to size x size
    resolution: int = 224          # encoder input side (Lite0's native 224)
    batch_size: int = 32
    fd_max: int = 1000             # every FD uses the same n = min(fd_max, smallest set compared) ...
    fd_draws: int = 10             # ... averaged over this many seeded draws of n images per set
    kid_subset_size: int = 1000    # cut to the smaller set
    kid_subsets: int = 100
    folds: int = 5                 # patient-grouped folds of the two-sample test
    l2: float = 100.0              # two-sample logistic regression: sum logloss + l2/2 |w|^2
    scorer_l2: float = 100.0       # the in-stage benign/malignant scorer (when no logits are given)
    sensitivity: float = 0.9       # translation success: threshold at this sensitivity on real val melanomas
    percentile: float = 1.0        # memorisation: percentile of the real test -> train distances
    probe_l2: float = 100.0        # criterion probe: each criterion's logistic regression, as l2 above
    probe_min_auc: float = 0.7     # a probe below this validation AUC "cannot see" its criterion
    probe_min_positives: int = 5   # fewer present (or absent) images in training or validation: no probe
    seed: int = 0
    weights: str | None = None     # encoder checkpoint instead of the packaged ImageNet Lite0 weights
    device: str = "cpu"


class Synthetic(NamedTuple):
    images: np.ndarray   # (M, H, W, 3) or (M, 3, H, W) uint8 translations
    sources: np.ndarray  # (M,) int: row of each translation's benign source in the real arrays


def load_translations(folder, size: int, real_names: Sequence[str]) -> Synthetic:
    """A `cyclegan.translate` output folder (train.csv with a source_image column, and its images)
    as `evaluate` input: each image decoded as the real ones are (`data.load_image(path, size)`),
    and the row of its source in `real_names` (e.g. the cache's names)."""
    index = data.read_index(folder)
    row = {n: i for i, n in enumerate(real_names)}
    sources = [r.extra.get("source_image", "") for r in index.records]
    unknown = [s for s in sources if s not in row]
    if unknown:
        raise ValueError(f"{folder}/train.csv: {len(unknown)} translation(s) name a source_image that is not "
                         f"among the real images (first: {unknown[0]!r}); pass the names of the data they "
                         f"were translated from")
    images = np.stack([data.load_image(r.path, size) for r in index.records])
    return Synthetic(images, np.array([row[s] for s in sources], dtype=np.int64))


def picture_names(key: str) -> dict[str, str]:
    """The files `evaluate` may write for the GAN run `key` into out_dir (the distribution is of
    severity or logit; criteria: the probe's gained/lost criteria). Only run 0 of each arm draws
    pictures, which keeps the files few."""
    if run_index(key) != 0:
        return {}
    return {k: f"quality_{key}_{k}.png" for k in ("pairs", "neighbours", "severity", "logit", "criteria")}


# ----------------------------------------------------------------------------- the stage

def evaluate(real_images, real_labels, real_patients, real_splits, synthetic: Mapping[str, Synthetic],
             severity=None, logits: Mapping | None = None, out_dir=None, cfg: QualityConfig | None = None,
             encoder: Encoder | None = None, criteria: Mapping[str, np.ndarray] | None = None) -> dict:
    """Measure each GAN arm's synthetic melanomas (the result: see the module docstring); write the
    pictures to out_dir (None: none). Decode real and synthetic images the same way and at the same
    size (e.g. `data.load_image(path, size)`, as the cache does), so that only content differs.

      real_images    (N, H, W, 3) or (N, 3, H, W) uint8, e.g. the `data.Cache` memmap
      real_labels, real_patients, real_splits   (N,) 0/1; patient ids (a patient stays in one fold
                     of the two-sample test); "train" / "val" / "test"
      synthetic      {key: Synthetic(images (M, H, W, 3) uint8, sources (M,) rows of each
                     translation's benign source in the real arrays)}, one key per GAN run,
                     f"{arm}_g{k}" (`quality.group_runs` groups them; a bare arm is one run)
      severity       (N,) hidden severity (`hidden_severity`), or None: real data, ground truth skipped
      logits         None (a logistic regression on real training features scores the images) or
                     {"real": (N,), NaN where unscored (validation and source rows need values),
                     "synthetic": {key: (M,)}} from a classifier trained on real images only
      encoder        an Encoder to reuse (default: `imagenet_encoder` from cfg)
      criteria       {criterion: (N,) 0/1} for every name in `quality.CRITERIA` (`hidden_criteria`),
                     or None: real data, criterion probe skipped
    """
    cfg = cfg or QualityConfig()
    t_start, cpu_start = time.monotonic(), time.process_time()
    d = _check_inputs(real_images, real_labels, real_patients, real_splits, severity, synthetic, logits)
    d["criteria"] = None if criteria is None else _check_criteria(criteria, len(d["labels"]))
    sets, picked = _choose_sets(d, cfg)
    encoder = encoder or imagenet_encoder(cfg.weights, cfg.resolution, cfg.batch_size, cfg.device)
    # Features: the stage's cost, timed apart
    t0, cpu0 = time.monotonic(), time.process_time()
    feats, syn_feats, n_encoded = _encode(d, sets, picked, encoder)
    t_features, cpu_features = time.monotonic() - t0, time.process_time() - cpu0
    log.info("quality: encoded %d images in %.1f s (%.1f images/s)", n_encoded, t_features, n_encoded / t_features)
    n_fd = min([cfg.fd_max] + [len(s) for s in sets.values()] + [len(p) for p in picked.values()])
    ctx = {"d": d, "cfg": cfg, "sets": sets, "picked": picked, "feats": feats, "syn_feats": syn_feats, "n_fd": n_fd,
           "logits": logits, "out_dir": None if out_dir is None else Path(out_dir), "memo": {},
           "train": np.concatenate([sets["real_mel_train"], sets["real_benign_train"]]),
           "val": np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])}
    result: dict = {
        "encoder": {"name": f"{ENCODER_NAME} (ImageNet weights)", "resolution": encoder.resolution,
                    "dim": encoder.dim, "features": "global-average-pooled last conv layer",
                    "note": "ImageNet features, not Inception-v3's: FD and KID compare within melano only, "
                            "not with published FIDs"},
        "sets": {**{k: len(v) for k, v in sets.items()}, **{f"evaluated_{a}": len(p) for a, p in picked.items()},
                 "fd_n": n_fd, "encoded_images": n_encoded},
        "reference": _reference(ctx)}
    result["severity_regressor"] = ctx["severity_regressor"] = _fit_severity(ctx)
    result["criteria_probe"] = ctx["criteria_probe"] = _fit_probes(ctx)
    if logits is None:  # the in-stage scorer: melanoma vs benign on real training features
        ctx["scorer"] = fit_logistic(feats[ctx["train"]], d["labels"][ctx["train"]], cfg.scorer_l2)
    result["arms"] = {key: _evaluate_arm(ctx, key) for key in d["arms"]}
    result["runs"] = over_runs(result["arms"])
    # CPU seconds as well: on a shared machine they say what the stage costs on an idle one
    result["timings_s"] = {"features": t_features, "total": time.monotonic() - t_start,
                           "images_per_s": n_encoded / t_features, "features_cpu": cpu_features,
                           "total_cpu": time.process_time() - cpu_start}
    result["config"] = dataclasses.asdict(cfg)
    return result


def _check_inputs(images, labels, patients, splits, severity, synthetic, logits) -> dict:
    n = len(images)
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"real_labels: need {n} labels of 0 (benign) or 1 (malignant), got shape {labels.shape}")
    if len(patients) != n or len(splits) != n:
        raise ValueError(f"real_patients ({len(patients)}) and real_splits ({len(splits)}) need one entry "
                         f"per real image ({n})")
    splits = np.asarray(splits).astype(str)
    bad = set(splits.tolist()) - set(SPLIT_NAMES)
    if bad:
        raise ValueError(f"real_splits: values must be {SPLIT_NAMES}, found {sorted(bad)}")
    if severity is not None and np.shape(severity) != (n,):
        raise ValueError(f"severity: need one value per real image ({n}), got shape {np.shape(severity)}")
    arms = {}
    for arm, syn in synthetic.items():
        imgs, src = as_nhwc(syn[0], f"synthetic[{arm!r}].images"), np.asarray(syn[1])
        if src.shape != (len(imgs),) or not np.issubdtype(src.dtype, np.integer) or src.min() < 0 or src.max() >= n:
            raise ValueError(f"synthetic[{arm!r}].sources: need {len(imgs)} integer rows in [0, {n}) of the "
                             f"real arrays, got shape {src.shape}, dtype {src.dtype}")
        if (labels[src] != 0).any():
            raise ValueError(f"synthetic[{arm!r}].sources: row {int(src[labels[src] != 0][0])} is not benign; "
                             f"translations must come from benign images")
        arms[arm] = Synthetic(imgs, src)
    if not arms:
        raise ValueError("synthetic: give at least one arm's translations")
    if logits is not None:
        if np.shape(logits.get("real")) != (n,) or set(logits.get("synthetic", {})) != set(arms):
            raise ValueError("logits: need {'real': (N,) array, NaN where unscored, 'synthetic': {arm: (M,) "
                             f"array}}}} for the arms {sorted(arms)}")
        for arm, syn in arms.items():
            if np.shape(logits["synthetic"][arm]) != (len(syn.images),):
                raise ValueError(f"logits['synthetic'][{arm!r}]: need {len(syn.images)} values")
    return {"images": as_nhwc(images, "real_images"), "labels": labels.astype(int),
            "patients": np.asarray(patients).astype(str), "splits": splits, "arms": arms,
            "severity": None if severity is None else np.asarray(severity, np.float64)}


def _check_criteria(criteria: Mapping[str, np.ndarray], n: int) -> dict:
    missing = [c for c in CRITERIA if c not in criteria]
    if missing:
        raise ValueError(f"criteria: missing {missing}; pass hidden_criteria(data_dir, names), which has all of "
                         f"{list(CRITERIA)}")
    out = {c: np.asarray(criteria[c]) for c in CRITERIA}
    for c, v in out.items():
        if v.shape != (n,) or not np.isin(v, (0, 1)).all():
            raise ValueError(f"criteria[{c!r}]: need {n} values of 0 (absent) or 1 (present), got shape {v.shape}")
    return {c: v.astype(int) for c, v in out.items()}


def _sample(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of `rows`, drawn without replacement, in their original order."""
    rows = np.asarray(rows)
    return rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False))


def _choose_sets(d: dict, cfg: QualityConfig) -> tuple[dict, dict]:
    """The real rows and translation indices that get encoded (seeded samples, see QualityConfig)."""
    labels, splits = d["labels"], d["splits"]
    rng = np.random.default_rng([cfg.seed, 11])
    sets = {f"real_mel_{s}": _sample(np.flatnonzero((labels == 1) & (splits == s)), cfg.max_reference, rng)
            for s in SPLIT_NAMES}
    # the same seed per arm: arms with the same sources share them
    picked = {arm: _sample(np.arange(len(syn.images)), cfg.max_images, np.random.default_rng([cfg.seed, 12]))
              for arm, syn in d["arms"].items()}
    evaluated_sources = np.unique(np.concatenate([d["arms"][a].sources[p] for a, p in picked.items()]))
    # Training benign images that are not evaluated sources: the regressor and scorer learn from them.
    train_benign = np.setdiff1d(np.flatnonzero((labels == 0) & (splits == "train")), evaluated_sources)
    sets["real_benign_train"] = _sample(train_benign, cfg.max_images, rng)
    sets["real_benign_val"] = _sample(np.flatnonzero((labels == 0) & (splits == "val")), cfg.max_images, rng)
    for name in ("real_mel_train", "real_mel_test", "real_mel_val", "real_benign_train", "real_benign_val"):
        if len(sets[name]) < 2:
            raise ValueError(f"{name}: only {len(sets[name])} image(s); the quality stage needs at least 2 "
                             f"(give more data, or larger validation/test fractions)")
    return sets, picked


def _encode(d: dict, sets: dict, picked: dict, encoder: Encoder) -> tuple[np.ndarray, dict, int]:
    """Features of every real row any set uses (NaN elsewhere) and of each arm's picked images."""
    rows = np.unique(np.concatenate([*sets.values()] + [d["arms"][a].sources[p] for a, p in picked.items()]))
    feats = np.full((len(d["images"]), encoder.dim), np.nan)
    feats[rows] = encoder(d["images"][rows])
    syn_feats = {a: encoder(d["arms"][a].images[p]) for a, p in picked.items()}
    return feats, syn_feats, len(rows) + sum(len(p) for p in picked.values())


# ----------------------------------------------------------------------------- against real melanomas

def _versus_mel_train(ctx: dict, feats: np.ndarray, groups, pixel_images: np.ndarray, pixel_groups) -> tuple:
    """A set against the real training melanomas: (FD and KID, two-sample AUC on features, on pixels).
    FD is the mean and sd over `fd_draws` seeded draws of n_fd images of each set, the same seeds for
    every pair, so equal sets give equal numbers."""
    d, cfg, mel = ctx["d"], ctx["cfg"], ctx["sets"]["real_mel_train"]
    f_mel, p_mel = ctx["feats"][mel], d["patients"][mel]
    rx, ry = np.random.default_rng([cfg.seed, 18]), np.random.default_rng([cfg.seed, 19])
    fds = [frechet_distance(feats[_sample(np.arange(len(feats)), ctx["n_fd"], rx)],
                            f_mel[_sample(np.arange(len(f_mel)), ctx["n_fd"], ry)]) for _ in range(cfg.fd_draws)]
    distances = {"fd": float(np.mean(fds)), "fd_sd": sample_sd(fds), "fd_n": ctx["n_fd"],
                 "kid": kid(feats, f_mel, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)}
    on_features = two_sample_auc(f_mel, feats, p_mel, groups, cfg.folds, cfg.l2, cfg.seed)
    # Pixels need no encoder, so more of them: a larger sample of the real melanomas
    rr = _sample(mel, cfg.max_pixel_images, np.random.default_rng([cfg.seed, 16]))
    on_pixels = two_sample_auc(pixel_features(d["images"][rr], cfg.pixel_size),
                               pixel_features(pixel_images, cfg.pixel_size), d["patients"][rr], pixel_groups,
                               cfg.folds, cfg.l2, cfg.seed)
    return distances, on_features, on_pixels


def _reference(ctx: dict) -> dict:
    """The scale of every number: real vs real, and real benign vs real malignant."""
    d, sets, p = ctx["d"], ctx["sets"], ctx["d"]["patients"]
    val_benign = np.flatnonzero((d["labels"] == 0) & (d["splits"] == "val"))[:ctx["cfg"].max_pixel_images]
    out: dict = {"distances": {}, "two_sample": {}}
    for name, rows, pixels in (("real_mel_test_vs_real_mel_train", sets["real_mel_test"], sets["real_mel_test"]),
                               ("real_benign_val_vs_real_mel_train", sets["real_benign_val"], val_benign)):
        distances, on_features, on_pixels = _versus_mel_train(ctx, ctx["feats"][rows], p[rows], d["images"][pixels],
                                                              p[pixels])
        out["distances"][name] = distances
        out["two_sample"][name] = {"features": on_features, "pixels": on_pixels}
    return out


def _fit_severity(ctx: dict) -> dict:
    """The severity regressor (fit on real training images) and its validation predictions, or the
    note that there is no ground truth (real data)."""
    d, train, val = ctx["d"], ctx["train"], ctx["val"]
    sev, labels = d["severity"], d["labels"]
    ctx["regressor"] = None
    if sev is None:
        return {"skipped": "no hidden severity for these images (not a melano.synth data set, e.g. real ISIC "
                           "images): ground truth not checked"}
    model = ctx["regressor"] = fit_ridge(ctx["feats"][train], sev[train])
    pred = predict(model, ctx["feats"][val])
    ctx["severity_val_pred"] = (pred[labels[val] == 0], pred[labels[val] == 1])
    return {
        "r2_val": r2_score(sev[val], pred), "alpha": model.alpha, "loo_mse_train": model.loo_mse,
        "n_train": int(len(train)), "n_val": int(len(val)),
        "true_benign": summarise(sev[labels == 0]), "true_malignant": summarise(sev[labels == 1]),
        "predicted_val_benign": summarise(ctx["severity_val_pred"][0]),
        "predicted_val_malignant": summarise(ctx["severity_val_pred"][1])}


# ----------------------------------------------------------------------------- criterion probe

THRESHOLD_NOTE = ("predicted present: logit >= the probe's prevalence threshold, at which it flags as many real "
                  "validation images as truly show the criterion (held-out logits, not overfit ones)")
CI_NOTE = ("paired normal 95% CI over the evaluated translations: mean change (translation minus its own "
           "source) +- 1.96 sd / sqrt(n)")
SHORT = {c: c.rsplit("_", 1)[-1] for c in CRITERIA}  # the last word: "network", "veil", ...


def _fit_probes(ctx: dict) -> dict:
    """One probe per criterion, fit on real training images (the evaluated sources left out: the
    probes are applied to them) and judged on real validation images (other patients)."""
    d, cfg, feats, train, val = ctx["d"], ctx["cfg"], ctx["feats"], ctx["train"], ctx["val"]
    ctx["probes"] = {}
    if d["criteria"] is None:
        return {"skipped": "no hidden criteria for these images (not a melano.synth data set, e.g. real ISIC "
                           "images): criterion probe not run"}
    per = {}
    for c in CRITERIA:
        y_tr, y_val = d["criteria"][c][train], d["criteria"][c][val]
        row = {"prevalence_train": float(y_tr.mean()), "prevalence_val": float(y_val.mean()),
               "n_present_train": int(y_tr.sum()), "n_present_val": int(y_val.sum())}
        if min(y_tr.sum(), len(y_tr) - y_tr.sum(), y_val.sum(), len(y_val) - y_val.sum()) < cfg.probe_min_positives:
            per[c] = {**row, "auc_val": None, "can_see": False,
                      "reason": f"fewer than {cfg.probe_min_positives} real training or validation images with "
                                f"(or without) it: no probe"}
            continue
        probe = ctx["probes"][c] = fit_probe(feats[train], y_tr, feats[val], y_val, cfg.probe_l2, cfg.probe_min_auc)
        per[c] = {**row, "auc_val": probe.auc_val, "can_see": bool(probe.can_see), "threshold": probe.threshold,
                  **_within_class_auc(predict(probe.model, feats[val]), y_val, d["labels"][val])}
    return {"criteria": per, "n_train": int(len(train)), "n_val": int(len(val)), "l2": cfg.probe_l2,
            "min_auc": cfg.probe_min_auc, "threshold_rule": THRESHOLD_NOTE,
            "malignant_structures": list(MALIGNANT_STRUCTURES), "short_names": SHORT,
            "model": "one L2 logistic regression per criterion on the encoder's features of real training images; "
                     "multicolour = 3 or more of Stolz's six colours"}


def _within_class_auc(logits: np.ndarray, present: np.ndarray, labels: np.ndarray) -> dict:
    """The probe's validation AUC among benign and among malignant images alone: a probe that only
    sees malignancy scores well overall (criteria come with melanoma) but not within a class."""
    out = {}
    for name, cls in (("auc_val_benign", 0), ("auc_val_malignant", 1)):
        y = present[labels == cls]
        out[name] = metrics.roc_auc(y, logits[labels == cls]) if min(y.sum(), len(y) - y.sum()) >= 3 else None
    return out


def _arm_criteria(ctx: dict, key: str, f_syn: np.ndarray, f_src: np.ndarray, src_rows: np.ndarray) -> dict:
    """Per criterion: truly present on the sources, predicted present on sources and translations,
    and the paired change; the 7-point score of the criteria the probes can see; the tint."""
    if not ctx["probes"]:
        return {"skipped": ctx["criteria_probe"].get("skipped", "no criterion had enough images for a probe")}
    truth, before, after, per = ctx["d"]["criteria"], {}, {}, {}
    for c in CRITERIA:
        probe = ctx["probes"].get(c)
        per[c] = {"true_sources": float(truth[c][src_rows].mean()), "can_see": bool(probe and probe.can_see)}
        if probe is not None:
            b, a = probe_present(probe, f_src), probe_present(probe, f_syn)
            per[c].update(present_sources=float(b.mean()), present_translations=float(a.mean()),
                          change=paired_change(a, b))
            if probe.can_see:
                before[c], after[c] = b, a
    ctx.setdefault("criteria_pairs", {})[key] = (before, after)
    true_score = seven_point_score({c: truth[c][src_rows] for c in CRITERIA})
    seven = {"true_sources": float(true_score.mean()), "counted": [c for c in before if c != "multicolour"]}
    if seven["counted"]:
        b, a = seven_point_score(before), seven_point_score(after)
        seven.update(predicted_sources=float(b.mean()), predicted_translations=float(a.mean()),
                     change=paired_change(a, b))
    return {"n": int(len(src_rows)), "ci_method": CI_NOTE, "criteria": per, "seven_point": seven,
            "colour_shift": _colour_shift(ctx, key)}


def _colour_shift(ctx: dict, key: str) -> dict:
    """The tint: each translation's mean R, G, B minus its source's (0-255), averaged over pairs,
    and the mean length of that per-pair shift."""
    syn, picked = ctx["d"]["arms"][key], ctx["picked"][key]
    mean_rgb = lambda images: images.reshape(len(images), -1, 3).mean(1, dtype=np.float64)
    shift = mean_rgb(syn.images[picked]) - mean_rgb(ctx["d"]["images"][syn.sources[picked]])
    return {"mean_rgb": [float(v) for v in shift.mean(0)], "size": float(np.linalg.norm(shift, axis=1).mean())}


# ----------------------------------------------------------------------------- GAN runs

def headline(arm: dict) -> dict[str, float]:
    """One GAN run's headline figures (those the report prints), flat, for the mean and sd over runs."""
    dist, two, ts, memo = arm["distances"], arm["two_sample"], arm["translation_success"], arm["memorisation"]
    out = {}
    for suffix, key in (("", "synthetic"), ("_sources", "sources")):
        dd = dist[f"{key}_vs_real_mel_train"]
        out.update({f"fd{suffix}": dd["fd"], f"kid{suffix}": dd["kid"]["mean"],
                    f"two_sample_features{suffix}": two["features"][key]["auc"],
                    f"two_sample_pixels{suffix}": two["pixels"][key]["auc"]})
    out.update(translations_above=ts["fraction_translations_above"], sources_above=ts["fraction_sources_above"],
               mean_logit_shift=ts["mean_logit_shift"], memorisation=memo["fraction_below_real_percentile"],
               memorisation_sources=memo["sources_fraction_below_real_percentile"])
    sev = arm["severity"]
    if "skipped" not in sev:
        out.update(severity_true_sources=sev["true_sources"]["median"],
                   severity_sources=sev["predicted_sources"]["median"],
                   severity_translations=sev["predicted_translations"]["median"],
                   severity_shift=sev["predicted_shift"]["mean"])
    crit = arm["criteria"]
    if "skipped" not in crit:
        for c, v in crit["criteria"].items():
            out[f"{c}_true_sources"] = v["true_sources"]
            if "change" in v:
                out.update({f"{c}_present_sources": v["present_sources"],
                            f"{c}_present_translations": v["present_translations"], f"{c}_change": v["change"]["mean"]})
        if "change" in crit["seven_point"]:
            out["seven_point_change"] = crit["seven_point"]["change"]["mean"]
        out["colour_shift"] = crit["colour_shift"]["size"]
    return out


def over_runs(arms: Mapping[str, dict]) -> dict:
    """{arm: {"runs": its GAN runs' keys, "mean": {figure: mean}, "sd": {figure: sd}}} over each
    arm's runs (`quality.group_runs`), of the `headline` figures."""
    out = {}
    for arm, keys in group_runs(list(arms)).items():
        mean, sd = mean_sd_over_runs([headline(arms[k]) for k in keys])
        out[arm] = {"runs": keys, "mean": mean, "sd": sd}
    return out


# ----------------------------------------------------------------------------- one arm

def _evaluate_arm(ctx: dict, arm: str) -> dict:
    d, cfg, feats = ctx["d"], ctx["cfg"], ctx["feats"]
    syn, picked = d["arms"][arm], ctx["picked"][arm]
    src_rows = syn.sources[picked]
    f_syn, f_src, groups = ctx["syn_feats"][arm], feats[src_rows], d["patients"][src_rows]
    pix = _sample(np.arange(len(syn.images)), cfg.max_pixel_images, np.random.default_rng([cfg.seed, 15]))
    pix_src = syn.sources[pix]
    # Distances and two-sample tests; arms translated from the same sources share the sources' numbers
    key = (src_rows.tobytes(), pix_src.tobytes())
    if key not in ctx["memo"]:
        ctx["memo"][key] = _versus_mel_train(ctx, f_src, groups, d["images"][pix_src], d["patients"][pix_src])
    src = ctx["memo"][key]
    new = _versus_mel_train(ctx, f_syn, groups, syn.images[pix], d["patients"][pix_src])
    out: dict = {"translations": len(syn.images), "evaluated": len(picked),
                 "distances": {"synthetic_vs_real_mel_train": new[0], "sources_vs_real_mel_train": src[0]},
                 "two_sample": {"features": {"synthetic": new[1], "sources": src[1]},
                                "pixels": {"synthetic": new[2], "sources": src[2]}}}
    # Translation success: does a classifier of real images call them malignant?
    scores = _arm_scores(ctx, arm)
    out["translation_success"] = {**translation_success(scores["val"], scores["val_labels"], scores["translations"],
                                                        scores["sources"], cfg.sensitivity),
                                  "scorer": scores["scorer"]}
    # Ground truth: the predicted hidden severity of translations and their sources
    sev = None if ctx["regressor"] is None else (predict(ctx["regressor"], f_syn), predict(ctx["regressor"], f_src))
    out["severity"] = (_arm_severity(*sev, d["severity"][src_rows], ctx["severity_regressor"]) if sev
                       else {"skipped": ctx["severity_regressor"]["skipped"]})
    out["memorisation"] = _arm_memorisation(ctx, f_syn, f_src, picked)
    out["criteria"] = _arm_criteria(ctx, arm, f_syn, f_src, src_rows)
    if ctx["out_dir"] is not None and picture_names(arm):
        out["pictures"] = _arm_pictures(ctx, arm, scores, sev, out["memorisation"])
    return out


def _arm_scores(ctx: dict, arm: str) -> dict:
    """Logits of the real validation images, all scored translations and their sources, and of the
    evaluated (picked) ones: from the given logits, or from the in-stage scorer on features."""
    d, syn, picked, logits = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm], ctx["logits"]
    if logits is not None:
        real = np.asarray(logits["real"], np.float64)
        val = np.flatnonzero((d["splits"] == "val") & np.isfinite(real))
        t_all, s_all = np.asarray(logits["synthetic"][arm], np.float64), real[syn.sources]
        if not (np.isfinite(t_all).all() and np.isfinite(s_all).all()):
            raise ValueError(f"logits: every translation of {arm!r} and every source row needs a finite logit")
        return {"val": real[val], "val_labels": d["labels"][val], "translations": t_all, "sources": s_all,
                "picked_translations": t_all[picked], "picked_sources": s_all[picked],
                "scorer": "given classifier logits"}
    model, val = ctx["scorer"], ctx["val"]
    t = predict(model, ctx["syn_feats"][arm])
    s = predict(model, ctx["feats"][syn.sources[picked]])
    return {"val": predict(model, ctx["feats"][val]), "val_labels": d["labels"][val],
            "translations": t, "sources": s, "picked_translations": t, "picked_sources": s,
            "scorer": "logistic regression on the ImageNet features of real training images "
                      "(melanoma vs benign), trained in this stage"}


def _arm_severity(pred_t: np.ndarray, pred_s: np.ndarray, true_s: np.ndarray, reg: dict) -> dict:
    """Predicted severity of translations and sources against the real validation distributions."""
    b_med, m_med = reg["predicted_val_benign"]["median"], reg["predicted_val_malignant"]["median"]
    return {"true_sources": summarise(true_s), "predicted_sources": summarise(pred_s),
            "predicted_translations": summarise(pred_t), "predicted_shift": summarise(pred_t - pred_s),
            "fraction_translations_above_benign_median": float((pred_t > b_med).mean()),
            "fraction_sources_above_benign_median": float((pred_s > b_med).mean()),
            "fraction_translations_above_malignant_median": float((pred_t > m_med).mean()),
            "fraction_sources_above_malignant_median": float((pred_s > m_med).mean())}


def _arm_memorisation(ctx: dict, f_syn: np.ndarray, f_src: np.ndarray, picked: np.ndarray) -> dict:
    """`quality.memorisation` of the translations, with "closest" indexing the caller's arrays."""
    feats, sets, cfg = ctx["feats"], ctx["sets"], ctx["cfg"]
    mel, f_test = sets["real_mel_train"], feats[sets["real_mel_test"]]
    memo = memorisation(f_syn, f_test, feats[mel], 8, cfg.percentile)
    # The same for the untranslated sources: how close images of this kind sit anyway (plain images
    # lie nearer to everything), the level a translation's fraction should be read against.
    control = memorisation(f_src, f_test, feats[mel], 0, cfg.percentile)
    memo["sources_nn_distance"] = control["synthetic_nn_distance"]
    memo["sources_fraction_below_real_percentile"] = control["fraction_below_real_percentile"]
    for c in memo["closest"]:
        c["synthetic"], c["real_train"] = int(picked[c["synthetic"]]), int(mel[c["real_train"]])
    return memo


def _arm_pictures(ctx: dict, arm: str, scores: dict, sev: tuple | None, memo: dict) -> dict:
    """Source | translation pairs, the translations nearest a real training melanoma, and the
    distribution of predicted severity (or of the classifier's logit)."""
    d, syn, picked, out_dir = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm], ctx["out_dir"]
    names, img, src_rows = picture_names(arm), d["images"], syn.sources[picked]
    show = _sample(np.arange(len(picked)), 16, np.random.default_rng([ctx["cfg"].seed, 14]))
    what, whose = ("severity", "the predicted") if sev else ("logit", "the classifier's")
    before, after = (sev[1], sev[0]) if sev else (scores["picked_sources"], scores["picked_translations"])
    grid = functools.partial(report.image_grid, cell=96, gap=4)
    pairs = grid([[img[src_rows[i]], syn.images[picked[i]]] for i in show], out_dir / names["pairs"], cols=4,
                 captions=[f"{what} {before[i]:.2f} -> {after[i]:.2f}" for i in show],
                 title=f"{arm}: benign source | its translation, with {whose} {what} of each")
    neighbours = grid(
        [[img[syn.sources[c["synthetic"]]], syn.images[c["synthetic"]], img[c["real_train"]]] for c in memo["closest"]],
        out_dir / names["neighbours"], cols=2, captions=[f"d = {c['distance']:.2f}" for c in memo["closest"]],
        title=f"{arm}: the 8 translations closest to a real training melanoma: source | translation | that melanoma")
    v, labels = scores["val"], scores["val_labels"]
    benign, mel = ctx["severity_val_pred"] if sev else (v[labels == 0], v[labels == 1])
    sources, translations = (sev[1], sev[0]) if sev else (scores["sources"], scores["translations"])
    samples = {"real benign (val)": benign, "real melanoma (val)": mel, "sources": sources,
               "translations": translations}
    plot = distribution_plot(samples, out_dir / names[what], title=arm,
                             xlabel=f"predicted {what}" if sev else "classifier logit")
    criteria = _criteria_picture(ctx, arm, show[:8], out_dir / names["criteria"])
    return {"pairs": str(pairs), "neighbours": str(neighbours), "distribution": str(plot) if plot else None,
            "criteria": str(criteria) if criteria else None}


def _criteria_picture(ctx: dict, key: str, show: np.ndarray, path: Path) -> Path | None:
    """Source | translation pairs, each captioned with the criteria the probes (those that can see)
    say it gained (+) or lost (-); None when no probe can see a criterion."""
    before, after = ctx.get("criteria_pairs", {}).get(key, ({}, {}))
    if not before:
        return None
    syn, picked = ctx["d"]["arms"][key], ctx["picked"][key]
    move = lambda c, i: ("+" if after[c][i] > before[c][i] else "-") + SHORT[c]
    captions = [" ".join(move(c, i) for c in before if after[c][i] != before[c][i]) or "no criterion changed"
                for i in show]
    return report.image_grid([[ctx["d"]["images"][syn.sources[picked[i]]], syn.images[picked[i]]] for i in show],
                             path, cols=2, cell=112, gap=4, col_gap=120, captions=captions,  # room for long captions
                             title=f"{key}: benign source | its translation; criteria the probe sees gained (+) "
                                   f"or lost (-)")


def distribution_plot(samples: Mapping[str, np.ndarray], path, xlabel: str, title: str = "") -> Path | None:
    """Overlaid histograms (as densities) of named samples; None when matplotlib is absent."""
    plt = report.pyplot()
    if plt is None:
        return None
    values = [np.asarray(v, np.float64) for v in samples.values() if len(v)]
    bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values) + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, v in samples.items():
        if len(v):
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, label=f"{name} (n={len(v)})")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=7)
    return report.save_figure(fig, path)
