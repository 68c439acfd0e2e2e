"""The experiment's report and every picture: the metrics table with DeLong CIs and paired
p-values, report.md, the ROC plot, image grids, and the CycleGAN's loss log and loss plot.

Inputs are the per-arm prediction CSVs that `melano.classifier` writes
(image_name, target, probability), all on the same test split.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from . import metrics, stats
from .infra.files import atomic_write

log = logging.getLogger(__name__)

# Test ROC AUCs the study reported (no confidence intervals were given).
STUDY_AUC = {"traditional": "0.79 (0.83 in an earlier version of the text)", "cyclegan": "0.87",
             "cyclegan_ls": "0.89"}


def read_predictions(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image_names, targets, probabilities) from a classifier predictions CSV."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"image_name", "target", "probability"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(need)} and at least one row")
    names = [r["image_name"] for r in rows]
    return (names, np.array([int(r["target"]) for r in rows]),
            np.array([float(r["probability"]) for r in rows]))


# The comparisons, declared before any result is seen: (a, b, role). Holm-adjusted as one family.
COMPARISONS = (("cyclegan", "oversample", "primary"), ("cyclegan", "traditional", "secondary"),
               ("cyclegan_ls", "cyclegan", "secondary"))


def load_arm_predictions(predictions: dict[str, list[str | Path]]) -> tuple[list[str], np.ndarray, dict]:
    """(test image names, labels, {arm: (K, n) probabilities}) with every seed of every arm on the
    same images in the same order; anything else would make paired comparisons meaningless."""
    names, y, out = None, None, {}
    for arm, paths in predictions.items():
        seeds = []
        for path in paths:
            n, t, p = read_predictions(path)
            order = np.argsort(n)
            n, t, p = [n[i] for i in order], t[order], p[order]
            if names is None:
                names, y = n, t
            elif n != names or not np.array_equal(t, y):
                raise ValueError(f"{path}: arm {arm!r} scored a different test set: the paired comparison needs "
                                 f"identical images and labels")
            seeds.append(p)
        out[arm] = np.stack(seeds)
    return names, y, out


VARIANCE_NOTE = (
    "each seed's DeLong CI covers test sampling only, treating the test images as independent; each "
    "seed's clustered CI is a patient-level bootstrap, which also covers test sampling only but respects "
    "that a patient's images are correlated; the mean ± sd over seeds shows the training variance (same "
    "split, same synthetic images, different classifier seeds); each comparison's CI and p come from a "
    "hierarchical bootstrap that resamples test patients and each arm's seeds, so they cover test "
    "sampling and training variance together (the test-only interval is in metrics.json too). None of "
    "these covers the variance of the CycleGAN's own training or of the split itself.")


def test_patients(split_csv: str | Path | None, names: list[str]) -> np.ndarray:
    """Patient id of each test image, from the experiment's splits.csv (each image its own patient
    when no split file is given)."""
    if split_csv is None:
        return np.array(names)
    with open(split_csv, newline="") as f:
        patient = {r["image_name"]: r["patient_id"] for r in csv.DictReader(f)}
    missing = [n for n in names if n not in patient]
    if missing:
        raise ValueError(f"{split_csv}: {len(missing)} test image(s) are not in the split file, e.g. {missing[0]}")
    return np.array([patient[n] for n in names])


def arm_metrics(arm: str, y: np.ndarray, groups: np.ndarray, probs: np.ndarray, n_boot: int, seed: int,
                level: float) -> dict:
    """One arm's row: per seed the AUC with DeLong and clustered CIs and the operating points;
    the mean and sd of the AUC over seeds."""
    seeds = []
    for k, p in enumerate(probs):
        auc, lo, hi = metrics.delong_ci(y, p, level=level)
        boot = stats.cluster_bootstrap_auc(y, p, groups, n_boot=n_boot, seed=seed + k, level=level)
        ops = stats.operating_points(y, p, groups, n_boot=n_boot, seed=seed + k, level=level)
        points = {m: {"estimate": v["estimate"], "ci": v["ci"]} for m, v in ops.items() if isinstance(v, dict)}
        seeds.append({"seed": k, "auc": auc, "ci_low": lo, "ci_high": hi, "clustered_ci": boot["ci"],
                      "clustered_se": boot["se"], "operating_points": points})
    aucs = np.array([s["auc"] for s in seeds])
    mean_points = {m: float(np.mean([s["operating_points"][m]["estimate"] for s in seeds]))
                   for m in seeds[0]["operating_points"]}
    return {"name": arm, "seeds": seeds, "auc_mean": float(aucs.mean()),
            "auc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0, "operating_points_mean": mean_points,
            "n_test": int(y.size), "n_test_positive": int(y.sum()), "n_test_patients": int(len(set(groups)))}


def experiment_metrics(predictions: dict[str, list[str | Path]], split_csv: str | Path | None, seed: int = 0,
                       level: float = 0.95, n_boot: int = 2000) -> dict:
    """Per arm: each seed's test AUC (DeLong and patient-clustered CIs) and operating points, the
    mean and sd over seeds; the declared comparisons, each with a ΔAUC CI and p covering test
    sampling and training variance, Holm-adjusted as one family."""
    names, y, probs = load_arm_predictions(predictions)
    groups = test_patients(split_csv, names)
    arms = [arm_metrics(a, y, groups, p, n_boot, seed, level) for a, p in probs.items()]
    comparisons = []
    for i, (a, b, role) in enumerate(COMPARISONS):
        if a in probs and b in probs:
            c = stats.compare_arms(y, groups, probs[a], probs[b], n_boot=n_boot, seed=seed + 100 + i, level=level)
            comparisons.append({"a": a, "b": b, "role": role, "delta": c["delta"], "ci_low": c["ci"][0],
                                "ci_high": c["ci"][1], "p": c["p"], "covers": c["covers"],
                                "test_only": c["test_only"], "p_delong_seed_mean": c["p_delong"]})
    for c, adj in zip(comparisons, stats.holm([c["p"] for c in comparisons]) if comparisons else []):
        c["p_holm"] = float(adj)
    return {"arms": arms, "comparisons": comparisons, "variance_note": VARIANCE_NOTE, "n_boot": n_boot}


def roc_plot(predictions: dict[str, str | Path], path: str | Path, title: str = "") -> Path | None:
    """Every arm's ROC curve on one plot; None (and a log line) when matplotlib is absent."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for arm, p in predictions.items():
        _, y, s = read_predictions(p)
        fpr, tpr, _ = metrics.roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{arm} (AUC {metrics.roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1),
           title=title or "test ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def image_grid(tiles: Sequence[Sequence], path: str | Path, pad: int = 2, *, cols: int = 1,
               cell: int | None = None, gap: int | None = None, col_gap: int | None = None,
               captions: Sequence[str] = (), title: str = "") -> Path:
    """The one grid painter (CycleGAN samples, synthetic pairs, the quality pictures), a PNG on white.

    Each tile is a row of images (H, W, 3) uint8 arrays or RGB PIL images, `pad` apart, resized to
    `cell` px squares (None: to the first image's size), with its caption under it. `cols` tiles a
    row, `gap` apart and from the edges (default pad; `col_gap` between columns, default gap)."""
    h, w = (cell, cell) if cell else np.asarray(tiles[0][0]).shape[:2]
    gap = pad if gap is None else gap
    col_gap = gap if col_gap is None else col_gap
    n = max(len(t) for t in tiles)
    tw, th, top = n * w + (n - 1) * pad, h + (14 if captions else 0), 18 if title else 0
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (2 * gap + cols * tw + (cols - 1) * col_gap, top + gap + rows * (th + gap)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 3), title, fill="black")
    for k, tile in enumerate(tiles):
        x0, y0 = gap + (k % cols) * (tw + col_gap), top + gap + (k // cols) * (th + gap)
        for j, img in enumerate(tile):
            img = Image.fromarray(np.asarray(img)).resize((w, h), Image.Resampling.BICUBIC)
            grid.paste(img, (x0 + j * (w + pad), y0))
        if captions:
            draw.text((x0 + 2, y0 + h + 1), captions[k], fill="black")
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))


# ----------------------------------------------------------------------------- CycleGAN losses

LOSS_KEYS = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")


class LossLog:
    """losses.csv: one row per CycleGAN step. On resume, rows after the checkpoint's step (written
    by a run killed before its next checkpoint) are dropped, so the file matches the weights."""

    columns = ("step", "epoch", "lr", *LOSS_KEYS, "seconds")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, buf.getvalue())  # header plus the rows still valid

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, lineterminator="\n").writerow({k: row.get(k, "") for k in self.columns})


def read_losses(path: str | Path) -> dict[str, np.ndarray]:
    """losses.csv -> {column: array}; missing values (e.g. identity off) are NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows])
            for k in rows[0]}


def _moving_average(y: np.ndarray, smooth: int) -> tuple[np.ndarray, int]:
    k = max(1, min(smooth, len(y) // 5 or 1))
    return np.convolve(np.nan_to_num(y), np.ones(k) / k, mode="valid"), k


def plot_losses(csv_path: str | Path, png_path: str | Path, smooth: int = 50) -> Path | None:
    """Loss curves (generator terms left, discriminators right), with a moving average of `smooth`
    steps. Returns None when matplotlib is not installed or there is nothing to plot."""
    plt = pyplot()
    d = read_losses(csv_path)
    if plt is None or not d or len(d["step"]) == 0:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], LOSS_KEYS[:6], "generators"), (axes[1], LOSS_KEYS[6:], "discriminators")):
        for k in keys:
            if k in d and not np.all(np.isnan(d[k])):
                y, n = _moving_average(d[k], smooth)
                ax.plot(d["step"][n - 1:], y, label=k, lw=1)
        ax.set(title=f"{title} (moving average)", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (logged) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install -e '.[plot]')")
        return None
    return plt


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _fmt_ci(lo, hi) -> str:
    return "—" if lo is None else f"{lo:.3f} to {hi:.3f}"


def _arm_lines(result: dict) -> list[str]:
    lines = ["| arm | steps | images seen | test AUC, mean ± sd over seeds | each seed: AUC (DeLong CI; clustered CI) | "
             "study reported |", "|---|---|---|---|---|---|"]
    for a in result["arms"]:
        seeds = "; ".join(f"{s['auc']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f}; "
                          f"{s['clustered_ci'][0]:.3f}–{s['clustered_ci'][1]:.3f})" for s in a["seeds"])
        lines.append(f"| {a['name']} | {a.get('steps', '?')} | {a.get('images_seen', '?')} | "
                     f"{a['auc_mean']:.3f} ± {a['auc_sd']:.3f} | {seeds} | {STUDY_AUC.get(a['name'], '—')} |")
    return lines


OPERATING_POINTS = (("sens_at_spec90", "sensitivity at 90% specificity"),
                    ("sens_at_spec95", "sensitivity at 95% specificity"),
                    ("spec_at_sens90", "specificity at 90% sensitivity"),
                    ("spec_at_sens95", "specificity at 95% sensitivity"),
                    ("pauc_sens80", "partial AUC above 80% sensitivity (ISIC 2024, max 0.2)"),
                    ("brier", "Brier score (lower is better)"))


def _operating_lines(result: dict) -> list[str]:
    """Mean over seeds, and seed 0's estimate with its patient-clustered 95% CI."""
    arms = result["arms"]
    lines = ["| operating point | " + " | ".join(a["name"] for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for key, label in OPERATING_POINTS:
        cells = []
        for a in arms:
            first = a["seeds"][0]["operating_points"][key]
            cells.append(f"{a['operating_points_mean'][key]:.3f} (seed 0: {first['estimate']:.3f}, "
                         f"{first['ci'][0]:.3f}–{first['ci'][1]:.3f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _comparison_lines(result: dict) -> list[str]:
    lines = ["| comparison | role | ΔAUC | 95% CI | p | Holm-adjusted p |", "|---|---|---|---|---|---|"]
    for c in result.get("comparisons", []):
        lines.append(f"| {c['a']} − {c['b']} | {c['role']} | {c['delta']:+.3f} | "
                     f"{_fmt_ci(c.get('ci_low'), c.get('ci_high'))} | {_fmt_p(c['p'])} | {_fmt_p(c['p_holm'])} |")
    return lines


def _fd(d: dict) -> str:
    return f"{d['fd']:.1f} ± {d['fd_sd']:.1f} | {d['kid']['mean']:.4f} ± {d['kid']['sd']:.4f}"


def _quality_lines(q: dict) -> list[str]:
    """The "Synthetic melanomas" section: distances with their scale, two-sample AUCs, translation
    success, hidden severity and memorisation, per GAN arm."""
    ref = q["reference"]
    lines = ["## Synthetic melanomas", "", f"Encoder: {q['encoder']['name']} at {q['encoder']['resolution']} px. "
             f"{q['encoder']['note']}", "",
             "| pair | FD ± sd over draws | KID ± sd over subsets |", "|---|---|---|",
             f"| real test melanomas vs real training melanomas (scale: no difference) | "
             f"{_fd(ref['distances']['real_mel_test_vs_real_mel_train'])} |",
             f"| real benign vs real training melanomas (scale: the class difference) | "
             f"{_fd(ref['distances']['real_benign_val_vs_real_mel_train'])} |"]
    for arm, a in q["arms"].items():
        lines.append(f"| {arm}: translations vs real training melanomas | {_fd(a['distances']['synthetic_vs_real_mel_train'])} |")
        lines.append(f"| {arm}: their benign sources vs real training melanomas | "
                     f"{_fd(a['distances']['sources_vs_real_mel_train'])} |")
    lines += ["", "Two-sample tests: a logistic regression told each set from the real training melanomas with "
              "patient-grouped cross-validation (AUC 0.5: indistinguishable).", "",
              "| set vs real training melanomas | on features | on 16x16 pixels |", "|---|---|---|"]
    for name, t in ref["two_sample"].items():
        lines.append(f"| {name.split('_vs_')[0].replace('_', ' ')} | {t['features']['auc']:.3f} | {t['pixels']['auc']:.3f} |")
    for arm, a in q["arms"].items():
        t = a["two_sample"]
        lines.append(f"| {arm} translations | {t['features']['synthetic']['auc']:.3f} | {t['pixels']['synthetic']['auc']:.3f} |")
        lines.append(f"| {arm} sources | {t['features']['sources']['auc']:.3f} | {t['pixels']['sources']['auc']:.3f} |")
    lines += ["", f"Translation success, scored by {q.get('scorer', 'a classifier trained on real images only')}: "
              "the share above the threshold that gives 90% sensitivity on real validation melanomas.", "",
              "| arm | translations above | their sources above | mean logit shift (sd) |", "|---|---|---|---|"]
    for arm, a in q["arms"].items():
        t = a["translation_success"]
        lines.append(f"| {arm} | {t['fraction_translations_above']:.3f} | {t['fraction_sources_above']:.3f} | "
                     f"{t['mean_logit_shift']:+.3f} ({t['sd_logit_shift']:.3f}) |")
    lines += [""] + _severity_lines(q) + ["", "Memorisation: nearest real training melanoma in feature space.", "",
              "| arm | share closer than the 1st percentile of real test-to-train distances |", "|---|---|"]
    for arm, a in q["arms"].items():
        m = a["memorisation"]
        share = next((v for k, v in m.items() if k.startswith("fraction")), None)
        lines.append(f"| {arm} | {share if share is None else f'{share:.3f}'} |")
    return lines + ["", "Pictures: `quality/` holds each arm's source/translation pairs, nearest-neighbour pairs "
                    "and the severity (or score) distributions.", ""]


def _severity_lines(q: dict) -> list[str]:
    reg = q["severity_regressor"]
    if "skipped" in reg:
        return [f"Ground truth (hidden severity): skipped, {reg['skipped']}"]
    lines = [f"Ground truth: a ridge regressor from features to the generator's hidden severity, fit on real "
             f"training images, has R² {reg['r2_val']:.2f} on real validation images. Real benign severities: "
             f"median {reg['true_benign']['median']:.2f}; real malignant: median {reg['true_malignant']['median']:.2f}.",
             "", "| arm | true severity of sources | predicted, sources | predicted, translations | paired shift |",
             "|---|---|---|---|---|"]
    for arm, a in q["arms"].items():
        v = a["severity"]
        if "skipped" in v:
            continue
        shift = v["predicted_shift"]
        lines.append(f"| {arm} | {v['true_sources']['median']:.2f} | {v['predicted_sources']['median']:.2f} | "
                     f"{v['predicted_translations']['median']:.2f} | {shift['mean']:+.3f} ± {shift['sd']:.3f} |")
    return lines + ["", "(medians; the shift is the mean ± sd over translations of predicted translation minus "
                    "predicted source)"]


def verdict(comparisons: list[dict], alpha: float = 0.05) -> str:
    """One sentence per declared comparison, decided by its Holm-adjusted p-value."""
    out = []
    for c in comparisons:
        name = f"`{c['a']}` vs `{c['b']}` ({c['role']})"
        if c["p_holm"] < alpha:
            word = "higher" if c["delta"] > 0 else "lower"
            out.append(f"{name}: `{c['a']}` scored a {word} test AUC ({c['delta']:+.3f}, Holm-adjusted "
                       f"p = {_fmt_p(c['p_holm'])}).")
        else:
            out.append(f"{name}: no detectable difference ({c['delta']:+.3f}, Holm-adjusted p = "
                       f"{_fmt_p(c['p_holm'])}); this experiment cannot tell them apart.")
    return " ".join(out)


def markdown_report(result: dict) -> str:
    """report.md: reads like a results section, with this run's numbers."""
    split = result.get("split_sizes", {})
    lines = ["# melano experiment report", "",
             f"Data: `{result.get('data', '?')}`. Preset: `{result.get('preset', '?')}`. "
             f"Classifier: `{result.get('arch', '?')}` at {result.get('size', '?')} px.", "",
             "## Results", "",
             "Every arm trained the same number of optimiser steps with the same batch size and schedule, "
             "once per seed, and was scored on the same held-out, patient-grouped test split.", ""]
    lines += _arm_lines(result) + [""]
    if result["arms"] and "operating_points" in result["arms"][0]["seeds"][0]:
        lines += ["### Operating points", "", "Mean over seeds; in brackets seed 0's estimate and its "
                  "patient-clustered bootstrap 95% CI (test sampling only).", ""]
        lines += _operating_lines(result) + [""]
    lines += ["## Declared comparisons", "",
              "Declared before any result was seen: the primary comparison `cyclegan` vs `oversample` "
              "(balance with synthetic melanomas, or with resampled real ones), and the secondary "
              "`cyclegan` vs `traditional` (the study's claim) and `cyclegan_ls` vs `cyclegan` (its second "
              "claim). The p-values are Holm-adjusted across this family, and the verdict uses the adjusted "
              "values.", ""]
    lines += _comparison_lines(result) + ["", verdict(result.get("comparisons", [])), ""]
    if result.get("synthetic_quality"):
        lines += _quality_lines(result["synthetic_quality"])
    lines += ["What each interval covers: " + result.get("variance_note", "each seed's DeLong CI covers test "
              "sampling only, treating images as independent."), ""]
    if split:
        lines += ["## Data and split", "", "| split | images | malignant | patients |", "|---|---|---|---|"]
        lines += [f"| {n} | {s['images']} | {s['malignant']} | {s['patients']} |" for n, s in split.items()]
        lines.append("")
    if result.get("deviations_from_study"):
        lines += ["## Deviations from the study's recipe", ""] + [f"- {d}" for d in result["deviations_from_study"]]
        lines.append("")
    guards = result.get("leakage_guards", {})
    if guards:
        lines += ["## Leakage guards", ""] + [f"- {t}: **{'yes' if ok else 'NO'}**" for t, ok in guards.items()]
        lines.append("")
    timings = result.get("timings_s", {})
    if timings:
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [""]
    lines += ["## Figures", "", "- `roc.png`: every arm's test ROC curve (seed 0).",
              "- `gan_losses.png`: the CycleGAN losses per step.",
              "- `synthetic_samples.png`: training-split benign sources (left) and their synthetic "
              "malignant translations (right).", ""]
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> Path:
    atomic_write(path, markdown_report(result))
    return Path(path)
