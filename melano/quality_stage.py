"""The quality stage: how good are each GAN arm's synthetic melanomas? It reads the images (or a
translate folder), samples the sets to encode, runs every measure of `melano.quality` beside its
scale references (real vs real, benign vs malignant) and draws the pictures.

Speed. Lite0 at 224 px encodes about 30-36 images/s on an idle 2-core CPU, half that when another
process shares it (`bench/bench_quality.py`), so `evaluate` encodes seeded samples of at most
`QualityConfig.max_images` images per set (translations, their sources, benign references) and all
real melanomas up to `max_reference`: about 1,040 images for the quick preset with two arms. The
sample sizes are part of the result ("sets").

Use (the real images as the GAN saw them, e.g. its cache):

    sev = hidden_severity(data_dir)                       # None for real ISIC data
    result = evaluate(cache.images, cache.targets, cache.patients, split_of_each_image,
                      {"cyclegan": load_translations(synth_dir, cache.size, cache.names)},
                      severity=None if sev is None else np.array([sev[n] for n in cache.names]),
                      out_dir=stage_folder)

The result, JSON-able ("fd" dicts are `_distance_pair`'s, two-sample dicts `quality.two_sample_auc`'s,
summaries `quality.summarise`'s; "mel" = melanomas):
  encoder             name, resolution, dim, and the note that these are ImageNet features
  sets                images per evaluated set: real_mel_{train,val,test}, real_benign_{train,val}
                      (benign_train excludes the evaluated sources), evaluated_<arm>, fd_n, encoded_images
  reference           distances, and two_sample {"features", "pixels"}, of real_mel_test_vs_real_mel_train
                      and real_benign_val_vs_real_mel_train: the scale of every arm's numbers
  severity_regressor  `_severity_context`'s numbers, or {"skipped": reason} without severities
  arms[arm]           translations (all given), evaluated (encoded sample); distances and two_sample
                      (features/pixels x synthetic/sources, each against the real training melanomas);
                      translation_success (+ "scorer"); severity (`_arm_severity`'s, or {"skipped"});
                      memorisation (`quality.memorisation`'s, "closest" indexing the arm's images and the
                      real arrays, + the same distance and fraction for the sources); with out_dir,
                      pictures {"pairs", "neighbours", "distribution"} (None without matplotlib)
  timings_s           features, total, images_per_s (wall); features_cpu, total_cpu (CPU seconds)
  config              the QualityConfig used
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import data, pretrained, report, synth
from .quality import (Encoder, Logistic, as_nhwc, fit_logistic, fit_ridge, frechet_distance, kid,
                      logistic_logits, memorisation, pixel_features, r2_score, ridge_predict, summarise,
                      translation_success, two_sample_auc)

log = logging.getLogger("melano.quality")

ENCODER_NAME = "tf_efficientnet_lite0"
SPLIT_NAMES = ("train", "val", "test")


def imagenet_encoder(weights: str | None = None, resolution: int = 224, batch_size: int = 32,
                     device: str = "cpu") -> Encoder:
    """The packaged ImageNet Lite0 (or the checkpoint `weights`) as an Encoder, at `resolution`
    (224: the weights' native size; smaller images are upsampled)."""
    return Encoder(pretrained.efficientnet(ENCODER_NAME, pretrained=weights or True), resolution, batch_size, device)


def hidden_severity(data_dir) -> dict[str, float] | None:
    """{image_name: severity} for a folder written by `melano.synth.generate`, from the hidden
    truth it wrote beside train.csv (synth_criteria.csv); None for any other folder: real data has
    no hidden truth. ValueError if train.csv lists images the truth file does not describe."""
    truth = synth.read_truth(data_dir)
    return None if truth is None else {name: float(t["s"]) for name, t in truth.items()}


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
    picked = {}
    for arm, syn in d["arms"].items():  # the same seed per arm: arms with the same sources share them
        picked[arm] = _sample(np.arange(len(syn.images)), cfg.max_images, np.random.default_rng([cfg.seed, 12]))
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


def _distance_pair(x, y, n_fd: int, cfg: QualityConfig) -> dict:
    """FD (mean and sd over `fd_draws` seeded draws of n_fd images of each set; the same seeds for
    every pair, so equal sets give equal numbers) and KID."""
    rx, ry = np.random.default_rng([cfg.seed, 18]), np.random.default_rng([cfg.seed, 19])
    fds = np.array([frechet_distance(x[_sample(np.arange(len(x)), n_fd, rx)], y[_sample(np.arange(len(y)), n_fd, ry)])
                    for _ in range(cfg.fd_draws)])
    return {"fd": float(fds.mean()), "fd_sd": float(fds.std(ddof=1)) if len(fds) > 1 else 0.0, "fd_n": n_fd,
            "kid": kid(x, y, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)}


def _arm_severity(pred_t: np.ndarray, pred_s: np.ndarray, true_s: np.ndarray, reg: dict) -> dict:
    """Predicted severity of translations and sources against the real validation distributions."""
    b_med, m_med = reg["predicted_val_benign"]["median"], reg["predicted_val_malignant"]["median"]
    return {"true_sources": summarise(true_s), "predicted_sources": summarise(pred_s),
            "predicted_translations": summarise(pred_t), "predicted_shift": summarise(pred_t - pred_s),
            "fraction_translations_above_benign_median": float((pred_t > b_med).mean()),
            "fraction_sources_above_benign_median": float((pred_s > b_med).mean()),
            "fraction_translations_above_malignant_median": float((pred_t > m_med).mean()),
            "fraction_sources_above_malignant_median": float((pred_s > m_med).mean())}


def _scorer(d: dict, sets: dict, feats: np.ndarray, cfg: QualityConfig) -> tuple[Logistic, np.ndarray]:
    """When no classifier logits are given: a logistic regression on the features of real training
    images (melanoma vs benign), and its logits for the real validation images."""
    train = np.concatenate([sets["real_mel_train"], sets["real_benign_train"]])
    model = fit_logistic(feats[train], d["labels"][train], cfg.scorer_l2)
    val = np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])
    return model, val


def _arm_scores(ctx: dict, arm: str) -> dict:
    """Logits of the real validation images, all scored translations and their sources, and of the
    evaluated (picked) ones: from the given logits, or from the in-stage scorer on features."""
    d, syn, picked = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm]
    logits = ctx["logits"]
    if logits is not None:
        real = np.asarray(logits["real"], np.float64)
        val = np.flatnonzero((d["splits"] == "val") & np.isfinite(real))
        t_all, s_all = np.asarray(logits["synthetic"][arm], np.float64), real[syn.sources]
        if not (np.isfinite(t_all).all() and np.isfinite(s_all).all()):
            raise ValueError(f"logits: every translation of {arm!r} and every source row needs a finite logit")
        return {"val": real[val], "val_labels": d["labels"][val], "translations": t_all, "sources": s_all,
                "picked_translations": t_all[picked], "picked_sources": s_all[picked],
                "scorer": "given classifier logits"}
    model, val = ctx["scorer"]
    t = logistic_logits(model, ctx["syn_feats"][arm])
    s = logistic_logits(model, ctx["feats"][syn.sources[picked]])
    return {"val": logistic_logits(model, ctx["feats"][val]), "val_labels": d["labels"][val],
            "translations": t, "sources": s, "picked_translations": t, "picked_sources": s,
            "scorer": "logistic regression on the ImageNet features of real training images "
                      "(melanoma vs benign), trained in this stage"}


def picture_names(arm: str) -> dict[str, str]:
    """The files `evaluate` may write for `arm` into out_dir (the distribution is of severity or logit)."""
    return {k: f"quality_{arm}_{k}.png" for k in ("pairs", "neighbours", "severity", "logit")}


def _arm_pictures(ctx: dict, arm: str, scores: dict, sev: tuple | None, memo: dict, out_dir: Path) -> dict:
    d, syn, picked = ctx["d"], ctx["d"]["arms"][arm], ctx["picked"][arm]
    names = picture_names(arm)
    real_img, src_rows = d["images"], syn.sources[picked]
    rng = np.random.default_rng([ctx["cfg"].seed, 14])
    show = _sample(np.arange(len(picked)), 16, rng)
    before, after = (sev[1], sev[0]) if sev else (scores["picked_sources"], scores["picked_translations"])
    what = "severity" if sev else "logit"
    grid = functools.partial(report.image_grid, cell=96, gap=4)
    whose = "the predicted" if sev else "the classifier's"
    pictures = {"pairs": str(grid(
        [[real_img[src_rows[i]], syn.images[picked[i]]] for i in show], out_dir / names["pairs"], cols=4,
        captions=[f"{what} {before[i]:.2f} -> {after[i]:.2f}" for i in show],
        title=f"{arm}: benign source | its translation, with {whose} {what} of each"))}
    pictures["neighbours"] = str(grid(
        [[real_img[src_rows[c["evaluated"]]], syn.images[c["synthetic"]], real_img[c["real_train"]]]
         for c in memo["closest"]], out_dir / names["neighbours"], cols=2,
        captions=[f"d = {c['distance']:.2f}" for c in memo["closest"]],
        title=f"{arm}: the 8 translations closest to a real training melanoma: source | translation | that melanoma"))
    if sev:
        reg_pred = ctx["severity_val_pred"]
        samples = {"real benign (val)": reg_pred[0], "real melanoma (val)": reg_pred[1],
                   "sources": sev[1], "translations": sev[0]}
    else:
        labels = scores["val_labels"]
        samples = {"real benign (val)": scores["val"][labels == 0], "real melanoma (val)": scores["val"][labels == 1],
                   "sources": scores["sources"], "translations": scores["translations"]}
    plot = distribution_plot(samples, out_dir / names[what],
                             xlabel=f"predicted {what}" if sev else "classifier logit", title=arm)
    pictures["distribution"] = str(plot) if plot else None
    return pictures


def distribution_plot(samples: Mapping[str, np.ndarray], path, xlabel: str, title: str = "") -> Path | None:
    """Overlaid histograms (as densities) of named samples; None when matplotlib is absent."""
    plt = report.pyplot()
    if plt is None:
        return None
    values = [np.asarray(v, np.float64) for v in samples.values() if len(v)]
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    bins = np.linspace(lo, hi + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name, v in samples.items():
        if len(v):
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, label=f"{name} (n={len(v)})")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _evaluate_arm(ctx: dict, arm: str) -> dict:
    d, cfg, sets, feats = ctx["d"], ctx["cfg"], ctx["sets"], ctx["feats"]
    syn, picked = d["arms"][arm], ctx["picked"][arm]
    f_syn, f_src, f_mel = ctx["syn_feats"][arm], feats[syn.sources[picked]], feats[sets["real_mel_train"]]
    rng = np.random.default_rng([cfg.seed, 15])
    out: dict = {"translations": len(syn.images), "evaluated": len(picked)}
    mel_rows, patients = sets["real_mel_train"], d["patients"]
    pix_syn = _sample(np.arange(len(syn.images)), cfg.max_pixel_images, rng)
    pix_src = syn.sources[pix_syn]
    groups = patients[syn.sources[picked]]
    # Arms translated from the same sources share the sources' numbers: computed once.
    memo, key = ctx["memo"], (syn.sources[picked].tobytes(), pix_src.tobytes())
    if key not in memo:
        memo[key] = (_distance_pair(f_src, f_mel, ctx["n_fd"], cfg),
                     two_sample_auc(f_mel, f_src, patients[mel_rows], groups, cfg.folds, cfg.l2, cfg.seed),
                     ctx["pixel_test"](mel_rows, d["images"][pix_src], patients[pix_src]))
    src_distances, src_features, src_pixels = memo[key]
    out["distances"] = {"synthetic_vs_real_mel_train": _distance_pair(f_syn, f_mel, ctx["n_fd"], cfg),
                        "sources_vs_real_mel_train": src_distances}
    out["two_sample"] = {
        "features": {"synthetic": two_sample_auc(f_mel, f_syn, patients[mel_rows], groups, cfg.folds, cfg.l2,
                                                 cfg.seed), "sources": src_features},
        "pixels": {"synthetic": ctx["pixel_test"](mel_rows, syn.images[pix_syn], patients[pix_src]),
                   "sources": src_pixels}}
    scores = _arm_scores(ctx, arm)
    out["translation_success"] = {**translation_success(scores["val"], scores["val_labels"], scores["translations"],
                                                        scores["sources"], cfg.sensitivity),
                                  "scorer": scores["scorer"]}
    sev = None
    if ctx["regressor"] is not None:
        pred_t, pred_s = ridge_predict(ctx["regressor"], f_syn), ridge_predict(ctx["regressor"], f_src)
        sev = (pred_t, pred_s)
        out["severity"] = _arm_severity(pred_t, pred_s, d["severity"][syn.sources[picked]],
                                        ctx["result"]["severity_regressor"])
    else:
        out["severity"] = {"skipped": ctx["result"]["severity_regressor"]["skipped"]}
    memo = memorisation(f_syn, feats[sets["real_mel_test"]], f_mel, 8, cfg.percentile)
    # The same for the untranslated sources: how close images of this kind sit anyway (plain images
    # lie nearer to everything), the level a translation's fraction should be read against.
    control = memorisation(f_src, feats[sets["real_mel_test"]], f_mel, 0, cfg.percentile)
    memo["sources_nn_distance"] = control["synthetic_nn_distance"]
    memo["sources_fraction_below_real_percentile"] = control["fraction_below_real_percentile"]
    for c in memo["closest"]:  # indices into the caller's arrays, not into the evaluated subsets
        c["evaluated"] = c["synthetic"]
        c["synthetic"], c["real_train"] = int(picked[c["synthetic"]]), int(mel_rows[c["real_train"]])
    out["memorisation"] = memo
    if ctx["out_dir"] is not None:
        out["pictures"] = _arm_pictures(ctx, arm, scores, sev, memo, ctx["out_dir"])
    for c in memo["closest"]:
        del c["evaluated"]
    return out


def _encode(d: dict, sets: dict, picked: dict, encoder: Encoder) -> tuple[np.ndarray, dict, int]:
    """Features of every real row any set uses (NaN elsewhere) and of each arm's picked images."""
    rows = np.unique(np.concatenate([*sets.values()] + [d["arms"][a].sources[p] for a, p in picked.items()]))
    feats = np.full((len(d["images"]), encoder.dim), np.nan)
    feats[rows] = encoder(d["images"][rows])
    syn_feats = {a: encoder(d["arms"][a].images[p]) for a, p in picked.items()}
    return feats, syn_feats, len(rows) + sum(len(p) for p in picked.values())


def _pixel_test(d: dict, cfg: QualityConfig, real_rows, images, groups) -> dict:
    """Two-sample AUC on downsampled pixels: real rows (sampled) against `images`."""
    rr = _sample(real_rows, cfg.max_pixel_images, np.random.default_rng([cfg.seed, 16]))
    return two_sample_auc(pixel_features(d["images"][rr], cfg.pixel_size), pixel_features(images, cfg.pixel_size),
                          d["patients"][rr], groups, cfg.folds, cfg.l2, cfg.seed)


def _severity_context(ctx: dict) -> None:
    """The severity regressor (fit on real training images) and its validation predictions, or the
    note that there is no ground truth (real data)."""
    d, sets, feats, result = ctx["d"], ctx["sets"], ctx["feats"], ctx["result"]
    sev, labels = d["severity"], d["labels"]
    if sev is None:
        result["severity_regressor"] = {"skipped": "no hidden severity for these images (not a melano.synth "
                                                   "data set, e.g. real ISIC images): ground truth not checked"}
        return
    train = np.concatenate([sets["real_mel_train"], sets["real_benign_train"]])
    val = np.concatenate([sets["real_mel_val"], sets["real_benign_val"]])
    model = ctx["regressor"] = fit_ridge(feats[train], sev[train])
    pred = ridge_predict(model, feats[val])
    ctx["severity_val_pred"] = (pred[labels[val] == 0], pred[labels[val] == 1])
    result["severity_regressor"] = {
        "r2_val": r2_score(sev[val], pred), "alpha": model.alpha, "loo_mse_train": model.loo_mse,
        "n_train": int(len(train)), "n_val": int(len(val)),
        "true_benign": summarise(sev[labels == 0]), "true_malignant": summarise(sev[labels == 1]),
        "predicted_val_benign": summarise(ctx["severity_val_pred"][0]),
        "predicted_val_malignant": summarise(ctx["severity_val_pred"][1])}


def evaluate(real_images, real_labels, real_patients, real_splits, synthetic: Mapping[str, Synthetic],
             severity=None, logits: Mapping | None = None, out_dir=None, cfg: QualityConfig | None = None,
             encoder: Encoder | None = None) -> dict:
    """Measure each GAN arm's synthetic melanomas (the result: see the module docstring); write the
    pictures to out_dir (None: none). Decode real and synthetic images the same way and at the same
    size (e.g. `data.load_image(path, size)`, as the cache does), so that only content differs.

      real_images    (N, H, W, 3) or (N, 3, H, W) uint8, e.g. the `data.Cache` memmap
      real_labels, real_patients, real_splits   (N,) 0/1; patient ids (a patient stays in one fold
                     of the two-sample test); "train" / "val" / "test"
      synthetic      {arm: Synthetic(images (M, H, W, 3) uint8, sources (M,) rows of each
                     translation's benign source in the real arrays)}
      severity       (N,) hidden severity (`hidden_severity`), or None: real data, ground truth skipped
      logits         None (a logistic regression on real training features scores the images) or
                     {"real": (N,), NaN where unscored (validation and source rows need values),
                     "synthetic": {arm: (M,)}} from a classifier trained on real images only
      encoder        an Encoder to reuse (default: `imagenet_encoder` from cfg)
    """
    cfg = cfg or QualityConfig()
    t_start, cpu_start = time.monotonic(), time.process_time()
    d = _check_inputs(real_images, real_labels, real_patients, real_splits, severity, synthetic, logits)
    sets, picked = _choose_sets(d, cfg)
    encoder = encoder or imagenet_encoder(cfg.weights, cfg.resolution, cfg.batch_size, cfg.device)
    t0, cpu0 = time.monotonic(), time.process_time()
    feats, syn_feats, n_encoded = _encode(d, sets, picked, encoder)
    t_features, cpu_features = time.monotonic() - t0, time.process_time() - cpu0
    log.info("quality: encoded %d images in %.1f s (%.1f images/s)", n_encoded, t_features, n_encoded / t_features)
    pixel_test = functools.partial(_pixel_test, d, cfg)
    n_fd = min([cfg.fd_max] + [len(s) for s in sets.values()] + [len(p) for p in picked.values()])
    result: dict = {
        "encoder": {"name": f"{ENCODER_NAME} (ImageNet weights)", "resolution": encoder.resolution,
                    "dim": encoder.dim, "features": "global-average-pooled last conv layer",
                    "note": "ImageNet features, not Inception-v3's: FD and KID compare within melano only, "
                            "not with published FIDs"},
        "sets": {**{k: len(v) for k, v in sets.items()}, **{f"evaluated_{a}": len(p) for a, p in picked.items()},
                 "fd_n": n_fd, "encoded_images": n_encoded},
    }
    result["reference"] = _reference(d, sets, feats, n_fd, cfg, pixel_test)
    ctx = {"d": d, "cfg": cfg, "sets": sets, "picked": picked, "feats": feats, "syn_feats": syn_feats,
           "n_fd": n_fd, "pixel_test": pixel_test, "logits": logits, "result": result, "regressor": None,
           "out_dir": None if out_dir is None else Path(out_dir), "memo": {}}
    _severity_context(ctx)
    if logits is None:
        ctx["scorer"] = _scorer(d, sets, feats, cfg)
    result["arms"] = {arm: _evaluate_arm(ctx, arm) for arm in d["arms"]}
    # CPU seconds as well: on a shared machine they say what the stage costs on an idle one
    result["timings_s"] = {"features": t_features, "total": time.monotonic() - t_start,
                           "images_per_s": n_encoded / t_features, "features_cpu": cpu_features,
                           "total_cpu": time.process_time() - cpu_start}
    result["config"] = dataclasses.asdict(cfg)
    return result


def _reference(d: dict, sets: dict, feats: np.ndarray, n_fd: int, cfg: QualityConfig, pixel_test) -> dict:
    """The scale of every number: real vs real, and real benign vs real malignant."""
    f = {k: feats[v] for k, v in sets.items()}
    p = d["patients"]
    mel, test, benign = sets["real_mel_train"], sets["real_mel_test"], sets["real_benign_val"]
    val_benign_all = np.flatnonzero((d["labels"] == 0) & (d["splits"] == "val"))
    return {
        "distances": {
            "real_mel_test_vs_real_mel_train": _distance_pair(f["real_mel_test"], f["real_mel_train"], n_fd, cfg),
            "real_benign_val_vs_real_mel_train": _distance_pair(f["real_benign_val"], f["real_mel_train"], n_fd, cfg)},
        "two_sample": {
            "real_mel_test_vs_real_mel_train": {
                "features": two_sample_auc(f["real_mel_train"], f["real_mel_test"], p[mel], p[test], cfg.folds,
                                           cfg.l2, cfg.seed),
                "pixels": pixel_test(mel, d["images"][test], p[test])},
            "real_benign_val_vs_real_mel_train": {
                "features": two_sample_auc(f["real_mel_train"], f["real_benign_val"], p[mel], p[benign], cfg.folds,
                                           cfg.l2, cfg.seed),
                "pixels": pixel_test(mel, d["images"][val_benign_all[:cfg.max_pixel_images]],
                                     p[val_benign_all[:cfg.max_pixel_images]])}},
    }
