"""The experiment's report: metrics.json's numbers from the arms' prediction CSVs (image_name,
target, probability; every arm on the same test split), report.md, and every picture: the ROC plot,
image grids, and the CycleGAN's loss log and loss plot."""

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

# The comparisons, declared before any result is seen: (a, b, role). Holm-adjusted as one family.
COMPARISONS = (("cyclegan", "oversample", "primary"), ("cyclegan", "traditional", "secondary"),
               ("cyclegan_ls", "cyclegan", "secondary"))

VARIANCE_NOTE = (
    "each seed's DeLong CI covers test sampling only, with the test images independent; its clustered CI, "
    "a patient-level bootstrap, covers test sampling only too, with a patient's images correlated; the "
    "mean ± sd over seeds shows the training variance: other classifier seeds on the same split and, for "
    "the CycleGAN arms, other GAN runs too (seed k trained on the images of its own GAN run k, trained with "
    "its own seed); each comparison's CI and p come from a hierarchical bootstrap over test patients and "
    "each arm's seeds, so they cover test sampling and all that training variance, the GANs' included (the "
    "test-only interval is in metrics.json too). None covers the variance of the split. The second "
    "clinic's figures are computed the same way, on its own patients.")
TEST_SETS = {"test": "the held-out test split", "ood": "the second clinic (out of distribution)"}


# ----------------------------------------------------------------------------- the numbers

def read_predictions(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image_names, targets, probabilities) from a classifier predictions CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"image_name", "target", "probability"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(need)} and at least one row")
    return ([r["image_name"] for r in rows], np.array([int(r["target"]) for r in rows]),
            np.array([float(r["probability"]) for r in rows]))


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
                level: float, gan_runs: Sequence[str] | None = None) -> dict:
    """One arm's row: per seed the AUC with DeLong and clustered CIs and the operating points (and
    the GAN run whose images it trained on); the mean and sd of the AUC over seeds."""
    seeds = []
    for k, p in enumerate(probs):
        auc, lo, hi = metrics.delong_ci(y, p, level=level)
        ops = stats.operating_points(y, p, groups, n_boot=n_boot, seed=seed + k, level=level)
        points = {m: {"estimate": v["estimate"], "ci": v["ci"]} for m, v in ops.items() if isinstance(v, dict)}
        # ops["auc"] is the cluster bootstrap of the AUC: stats.cluster_bootstrap_auc's draws and interval
        seeds.append({"seed": k, "auc": auc, "ci_low": lo, "ci_high": hi, "clustered_ci": ops["auc"]["ci"],
                      "clustered_se": ops["auc"]["se"], "operating_points": points,
                      **({"gan_run": gan_runs[k]} if gan_runs else {})})
    aucs = np.array([s["auc"] for s in seeds])
    mean_points = {m: float(np.mean([s["operating_points"][m]["estimate"] for s in seeds]))
                   for m in seeds[0]["operating_points"]}
    return {"name": arm, "seeds": seeds, "auc_mean": float(aucs.mean()),
            "auc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0, "operating_points_mean": mean_points,
            "n_test": int(y.size), "n_test_positive": int(y.sum()), "n_test_patients": int(len(set(groups)))}


def test_set_metrics(predictions: dict[str, list[str | Path]], patients_csv: str | Path | None, seed: int,
                     level: float, n_boot: int, gan_runs: dict[str, list[str]]) -> dict:
    """One test set: each arm's row (`arm_metrics`) and the declared comparisons, not yet adjusted."""
    names, y, probs = load_arm_predictions(predictions)
    groups = test_patients(patients_csv, names)
    arms = [arm_metrics(a, y, groups, p, n_boot, seed, level, gan_runs.get(a)) for a, p in probs.items()]
    comparisons = []
    for i, (a, b, role) in enumerate(COMPARISONS):
        if a in probs and b in probs:
            c = stats.compare_arms(y, groups, probs[a], probs[b], n_boot=n_boot, seed=seed + 100 + i, level=level)
            comparisons.append({"a": a, "b": b, "role": role, "delta": c["delta"], "ci_low": c["ci"][0],
                                "ci_high": c["ci"][1], "p": c["p"], "covers": c["covers"],
                                "test_only": c["test_only"], "p_delong_seed_mean": c["p_delong"]})
    return {"arms": arms, "comparisons": comparisons}


def experiment_metrics(predictions: dict[str, list[str | Path]], split_csv: str | Path | None, seed: int = 0,
                       level: float = 0.95, n_boot: int = 2000, ood: tuple | None = None,
                       gan_runs: dict[str, list[str]] | None = None) -> dict:
    """Per arm: each seed's test AUC (DeLong and patient-clustered CIs) and operating points, the
    mean and sd over seeds; the declared comparisons, each with a ΔAUC CI and p covering test
    sampling and training variance. `ood` = (predictions, patients CSV) of a second test set, scored
    the same way; the comparisons of both test sets are Holm-adjusted as one family."""
    sets = {name: test_set_metrics(*args, seed, level, n_boot, gan_runs or {})
            for name, args in (("test", (predictions, split_csv)), ("ood", ood)) if args is not None}
    family = [{**c, "test_set": name} for name, s in sets.items() for c in s["comparisons"]]
    for c, adj in zip(family, stats.holm([c["p"] for c in family]) if family else []):
        c["p_holm"] = float(adj)
    return {"arms": sets["test"]["arms"], "ood": {"arms": sets["ood"]["arms"]} if "ood" in sets else None,
            "comparisons": family, "variance_note": VARIANCE_NOTE, "n_boot": n_boot}


# ----------------------------------------------------------------------------- pictures

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


def save_figure(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Lay out, write and close a pyplot figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


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
    return save_figure(fig, path)


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


def plot_losses(csv_path: str | Path, png_path: str | Path, smooth: int = 50) -> Path | None:
    """Loss curves (generator terms left, discriminators right), each a moving average of `smooth`
    steps (at most a fifth of the run). None when matplotlib is not installed or there is nothing
    to plot; missing values (e.g. identity off) are NaN."""
    plt = pyplot()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if plt is None or not rows:
        return None
    d = {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in rows[0]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], LOSS_KEYS[:6], "generators"), (axes[1], LOSS_KEYS[6:], "discriminators")):
        for k in keys:
            if k in d and not np.all(np.isnan(d[k])):
                n = max(1, min(smooth, len(d[k]) // 5 or 1))
                ax.plot(d["step"][n - 1:], np.convolve(np.nan_to_num(d[k]), np.ones(n) / n, mode="valid"),
                        label=k, lw=1)
        ax.set(title=f"{title} (moving average)", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    return save_figure(fig, png_path, dpi=100)


# ----------------------------------------------------------------------------- report.md

OPERATING_POINTS = (("sens_at_spec90", "sensitivity at 90% specificity"),
                    ("sens_at_spec95", "sensitivity at 95% specificity"),
                    ("spec_at_sens90", "specificity at 90% sensitivity"),
                    ("spec_at_sens95", "specificity at 95% sensitivity"),
                    ("pauc_sens80", "partial AUC above 80% sensitivity (ISIC 2024, max 0.2)"),
                    ("brier", "Brier score (lower is better)"))


def _table(header: Sequence[str], rows) -> list[str]:
    """A markdown table, then an empty line."""
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _fmt_p(p: float | None) -> str:
    return "—" if p is None else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _fd(d: dict) -> str:
    return f"{d['fd']:.1f} ± {d['fd_sd']:.1f} | {d['kid']['mean']:.4f} ± {d['kid']['sd']:.4f}"


def _point(arm: dict, key: str) -> str:
    """The mean over seeds, and seed 0's estimate with its patient-clustered CI."""
    first = arm["seeds"][0]["operating_points"][key]
    return (f"{arm['operating_points_mean'][key]:.3f} (seed 0: {first['estimate']:.3f}, "
            f"{first['ci'][0]:.3f}–{first['ci'][1]:.3f})")


def _arms_table(arms: list[dict], study: bool = True) -> list[str]:
    """One row per arm; `study`: with the AUC the study reported (on its own test split only)."""
    return _table(("arm", "steps", "images seen", "AUC, mean ± sd over seeds",
                   "each seed: AUC (DeLong CI; clustered CI)", *(("study reported",) if study else ())), [
        (a["name"], a.get("steps", "?"), a.get("images_seen", "?"), f"{a['auc_mean']:.3f} ± {a['auc_sd']:.3f}",
         "; ".join(f"{s['auc']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f}; {s['clustered_ci'][0]:.3f}–"
                   f"{s['clustered_ci'][1]:.3f})" for s in a["seeds"]),
         *((STUDY_AUC.get(a["name"], "—"),) if study else ()))
        for a in arms])


def _results_lines(result: dict) -> list[str]:
    """The arms' AUCs on each test set, their operating points, and the declared comparisons with
    the verdict for each test set."""
    arms, comparisons = result["arms"], result.get("comparisons", [])
    lines = _arms_table(arms)
    if result.get("ood"):
        lines += ["### The second clinic (out of distribution)", "", "The same classifiers, scored on "
                  "another clinic's images: other patients, skin types, scope and camera.", ""]
        lines += _arms_table([{**a, **{k: v for k, v in b.items() if k in ("steps", "images_seen")}}
                              for a, b in zip(result["ood"]["arms"], arms)], study=False)
    if arms and "operating_points" in arms[0]["seeds"][0]:
        lines += ["### Operating points", "", "Held-out test split. Mean over seeds; in brackets seed 0's estimate "
                  "and its patient-clustered bootstrap 95% CI (test sampling only).", ""]
        lines += _table(("operating point", *(a["name"] for a in arms)),
                        [(label, *(_point(a, key) for a in arms)) for key, label in OPERATING_POINTS])
    sets = list(dict.fromkeys(c.get("test_set", "test") for c in comparisons))
    lines += ["## Declared comparisons", "", "Declared before any result was seen: primary `cyclegan` vs "
              "`oversample` (balance with synthetic or with resampled real melanomas); secondary `cyclegan` vs "
              "`traditional` and `cyclegan_ls` vs `cyclegan` (the study's two claims)"
              + (", each on both test sets" if len(sets) > 1 else "") + ". The p-values are Holm-adjusted across "
              f"this family of {len(comparisons)}, and the verdict uses the adjusted values.", ""]
    lines += _table(("test set", "comparison", "role", "ΔAUC", "95% CI", "p", "Holm-adjusted p"), [
        (c.get("test_set", "test"), f"{c['a']} − {c['b']}", c["role"], f"{c['delta']:+.3f}",
         "—" if c.get("ci_low") is None else f"{c['ci_low']:.3f} to {c['ci_high']:.3f}", _fmt_p(c["p"]),
         _fmt_p(c["p_holm"])) for c in comparisons])
    for s in sets:
        lines += [f"On {TEST_SETS.get(s, s)}: " + verdict([c for c in comparisons if c.get("test_set", "test") == s]),
                  ""]
    return lines


def _over_runs(q: dict, arm: str, key: str, digits: int = 3, sign: str = "") -> str:
    """An arm's figure: the mean over its GAN runs, "± sd" over runs when there are several."""
    r = q["runs"][arm]
    if key not in r["mean"]:
        return "—"
    text = f"{r['mean'][key]:{sign}.{digits}f}"
    return text + (f" ± {r['sd'][key]:.{digits}f}" if len(r["runs"]) > 1 else "")


def _quality_lines(q: dict) -> list[str]:
    """The "Synthetic melanomas" section: distances with their scale, two-sample AUCs, translation
    success, hidden severity, memorisation and the criteria, per GAN arm (mean ± sd over its runs)."""
    if "runs" not in q:
        return ["## Synthetic melanomas", "", "quality.json predates per-GAN-run figures: rerun the quality stage.", ""]
    ref, runs = q["reference"], q["runs"]
    lines = ["## Synthetic melanomas", "", f"Encoder: {q['encoder']['name']} at {q['encoder']['resolution']} px. "
             f"{q['encoder']['note']}", "",
             "GAN runs per arm: " + ", ".join(f"`{a}` {len(r['runs'])}" for a, r in runs.items()) + ". An arm's figure "
             "is the mean over its GAN runs, ± the sd over runs where it has several (each run's figures are in "
             "metrics.json).", ""]
    fd = lambda a, s: f"{_over_runs(q, a, 'fd' + s, 1)} | {_over_runs(q, a, 'kid' + s, 4)}"
    lines += _table(("pair", "FD ± sd over draws (runs: over runs)", "KID ± sd over subsets (runs: over runs)"), [
        ("real test melanomas vs real training melanomas (scale: no difference)",
         _fd(ref["distances"]["real_mel_test_vs_real_mel_train"])),
        ("real benign vs real training melanomas (scale: the class difference)",
         _fd(ref["distances"]["real_benign_val_vs_real_mel_train"]))] + [
        (f"{arm}: {kind} vs real training melanomas", fd(arm, s))
        for arm in runs for kind, s in (("translations", ""), ("their benign sources", "_sources"))])
    lines += ["Two-sample tests: a logistic regression told each set from the real training melanomas with "
              "patient-grouped cross-validation (AUC 0.5: indistinguishable).", ""]
    two = [(name.split("_vs_")[0].replace("_", " "), f"{t['features']['auc']:.3f}", f"{t['pixels']['auc']:.3f}")
           for name, t in ref["two_sample"].items()]
    two += [(f"{arm} {kind}", *(_over_runs(q, arm, f"two_sample_{on}{s}") for on in ("features", "pixels")))
            for arm in runs for kind, s in (("translations", ""), ("sources", "_sources"))]
    lines += _table(("set vs real training melanomas", "on features", "on 16x16 pixels"), two)
    lines += [f"Translation success, scored by {q.get('scorer', 'a classifier trained on real images only')}: "
              "the share above the threshold that gives 90% sensitivity on real validation melanomas.", ""]
    lines += _table(("arm", "translations above", "their sources above", "mean logit shift"), [
        (arm, _over_runs(q, arm, "translations_above"), _over_runs(q, arm, "sources_above"),
         _over_runs(q, arm, "mean_logit_shift", sign="+")) for arm in runs])
    lines += _severity_lines(q) + _criteria_lines(q)
    lines += ["Memorisation: nearest real training melanoma in feature space.", ""]
    lines += _table(("arm", "share closer than the 1st percentile of real test-to-train distances", "their sources"),
                    [(arm, _over_runs(q, arm, "memorisation"), _over_runs(q, arm, "memorisation_sources"))
                     for arm in runs])
    return lines + ["Pictures: `quality/` holds, for run 0 of each arm, the source/translation pairs, "
                    "nearest-neighbour pairs, the severity (or score) distributions and the criteria the probe "
                    "saw gained or lost.", ""]


def _severity_lines(q: dict) -> list[str]:
    reg = q["severity_regressor"]
    if "skipped" in reg:
        return [f"Ground truth (hidden severity): skipped, {reg['skipped']}", ""]
    lines = [f"Ground truth: a ridge regressor from features to the generator's hidden severity, fit on real "
             f"training images, has R² {reg['r2_val']:.2f} on real validation images. Real benign severities: "
             f"median {reg['true_benign']['median']:.2f}; real malignant: median "
             f"{reg['true_malignant']['median']:.2f}.", ""]
    lines += _table(("arm", "true severity of sources", "predicted, sources", "predicted, translations",
                     "mean paired shift"), [
        (arm, _over_runs(q, arm, "severity_true_sources", 2), _over_runs(q, arm, "severity_sources", 2),
         _over_runs(q, arm, "severity_translations", 2), _over_runs(q, arm, "severity_shift", sign="+"))
        for arm in q["runs"] if "severity_shift" in q["runs"][arm]["mean"]])
    return lines + ["(medians over translations; the shift is the mean over translations of predicted translation "
                    "minus predicted source)", ""]


def _change_cis(q: dict, arm: str, c: str) -> tuple[list, int, int]:
    """The 95% CI of criterion c's paired change (or the 7-point score's) in each GAN run of `arm`, and
    in how many runs it lies above 0 and below 0."""
    crit = [q["arms"][k]["criteria"] for k in q["runs"][arm]["runs"]]
    cis = [(a["seven_point"] if c == "seven_point" else a["criteria"][c])["change"]["ci"] for a in crit]
    return cis, sum(lo > 0 for lo, _ in cis), sum(hi < 0 for _, hi in cis)


def _change_cell(q: dict, arm: str, c: str) -> str:
    """A visible criterion's paired change: one run's mean and 95% CI, or the mean ± sd over runs
    and in how many runs the CI lies above (below) 0."""
    if c + "_change" not in q["runs"][arm]["mean"]:
        return "—"
    cis, up, down = _change_cis(q, arm, c)
    if len(cis) == 1:
        return f"{_over_runs(q, arm, c + '_change', sign='+')} ({cis[0][0]:+.3f} to {cis[0][1]:+.3f})"
    return (f"{_over_runs(q, arm, c + '_change', sign='+')}; CI above 0 in {up}/{len(cis)} runs, "
            f"below 0 in {down}/{len(cis)}")


def _criteria_lines(q: dict) -> list[str]:
    """The criteria table (per arm: each criterion's probe AUC, presence on sources and translations,
    the paired change) and, per arm, the plain-words answer: does it add malignant structures?"""
    probe = q.get("criteria_probe")
    if probe is None:
        return []
    if "skipped" in probe:
        return [f"Dermoscopic criteria: skipped, {probe['skipped']}", ""]
    crit = probe["criteria"]
    lines = [f"Dermoscopic criteria: a probe per criterion (L2 logistic regression on the features of "
             f"{probe['n_train']} real training images) read each one; its ROC AUC on {probe['n_val']} real "
             f"validation images (other patients; in brackets among benign images alone) says whether it can see "
             f"it. Below {probe['min_auc']:.2f} it cannot, and draws no conclusion. "
             f"{probe['threshold_rule'][0].upper() + probe['threshold_rule'][1:]}. The change is each translation "
             f"minus its own source, with a paired normal 95% CI.", ""]
    for arm in q["runs"]:
        rows = []
        for c, p in crit.items():
            auc = "no probe" if p["auc_val"] is None else f"{p['auc_val']:.3f}" + (
                f" ({p['auc_val_benign']:.3f})" if p.get("auc_val_benign") is not None else "")
            seen = [_over_runs(q, arm, f"{c}_{w}") for w in ("present_sources", "present_translations")]
            change = _change_cell(q, arm, c) if p["can_see"] else "cannot see: no conclusion"
            rows.append((c.replace("_", " "), auc, _over_runs(q, arm, f"{c}_true_sources"),
                         *(seen if p["can_see"] else ("—", "—")), change))
        rows.append(("7-point score (of the criteria it can see)", "", "", "", "", _change_cell(q, arm, "seven_point")))
        lines += [f"`{arm}`:", ""] + _table(("criterion", "probe val AUC", "truly on sources", "predicted on sources",
                                             "on translations", "paired change"), rows)
    return lines + [" ".join(_structure_sentence(q, arm) for arm in q["runs"]), ""]


def _structure_sentence(q: dict, arm: str) -> str:
    """Does `arm` add malignant structures, or only tint? A structure is added (removed) when its
    probe can see it and its change's 95% CI lies above (below) 0 in every GAN run."""
    probe, n = q["criteria_probe"], len(q["runs"][arm]["runs"])
    added, removed, some, still, blind = [], [], [], [], []
    for c in probe["malignant_structures"]:
        name = probe["short_names"][c]
        if not probe["criteria"][c]["can_see"]:
            blind.append(name)
            continue
        _, up, down = _change_cis(q, arm, c)
        (added if up == n else removed if down == n else some if up else still).append((name, up))
    runs = "every GAN run" if n > 1 else "its GAN run"
    names = lambda xs: ", ".join(x for x, _ in xs)
    if not (added or removed or some or still):
        return f"The probe cannot see any malignant structure, so this experiment cannot say whether `{arm}` adds them."
    if added:
        text = f"`{arm}` adds malignant structures: {names(added)} (the probe sees each, and its change's CI lies " \
               f"above 0 in {runs})."
    else:
        text = f"`{arm}` adds none of the malignant structures the probe can see ({names(some + still + removed)}) " \
               f"in {runs}."
    if some:
        text += " Added in some GAN runs only: " + ", ".join(f"{x} ({k}/{n})" for x, k in some) + "."
    if added and still:
        text += f" No clear change in {names(still)}."
    if removed:
        text += f" It removes {names(removed)} (CI below 0 in {runs})."
    if not added and not some:
        text += f" So, as far as the probe can see, it at most tints the lesion (an image's mean colour moves by " \
                f"{_over_runs(q, arm, 'colour_shift', 1)} of 255)."
    if blind:
        text += f" The probe cannot see {', '.join(blind)} (validation AUC < {probe['min_auc']:.2f}): no conclusion."
    return text


def verdict(comparisons: list[dict], alpha: float = 0.05) -> str:
    """One sentence per declared comparison, decided by its Holm-adjusted p-value."""
    out = []
    for c in comparisons:
        name, p = f"`{c['a']}` vs `{c['b']}` ({c['role']})", _fmt_p(c["p_holm"])
        if c["p_holm"] < alpha:
            word = "higher" if c["delta"] > 0 else "lower"
            out.append(f"{name}: `{c['a']}` scored a {word} AUC ({c['delta']:+.3f}, Holm-adjusted p = {p}).")
        else:
            out.append(f"{name}: no detectable difference ({c['delta']:+.3f}, Holm-adjusted p = {p}); this "
                       f"experiment cannot tell them apart.")
    return " ".join(out)


def markdown_report(result: dict) -> str:
    """report.md: reads like a results section, with this run's numbers."""
    lines = ["# melano experiment report", "",
             f"Data: `{result.get('data', '?')}`. Preset: `{result.get('preset', '?')}`. "
             f"Classifier: `{result.get('arch', '?')}` at {result.get('size', '?')} px.", "",
             "## Results", "",
             "Every arm trained the same number of optimiser steps with the same batch size and schedule, "
             "once per seed, and was scored on the same held-out, patient-grouped test split.", ""]
    lines += _results_lines(result)
    if result.get("synthetic_quality"):
        lines += _quality_lines(result["synthetic_quality"])
    lines += ["What each interval covers: " + result.get("variance_note", "each seed's DeLong CI covers test "
              "sampling only, treating images as independent."), ""]
    if result.get("split_sizes"):
        lines += ["## Data and split", ""] + _table(("split", "images", "malignant", "patients"), [
            (n, s["images"], s["malignant"], s["patients"]) for n, s in result["split_sizes"].items()])
    if result.get("deviations_from_study"):
        lines += ["## Deviations from the study's recipe", "", *(f"- {d}" for d in result["deviations_from_study"]), ""]
    if result.get("leakage_guards"):
        lines += ["## Leakage guards", ""] + [f"- {t}: **{'yes' if ok else 'NO'}**"
                                               for t, ok in result["leakage_guards"].items()] + [""]
    if result.get("timings_s"):
        lines += ["## Wall time per stage", ""] + _table(("stage", "seconds"), [
            (k, f"{v:.0f}") for k, v in result["timings_s"].items()])
    lines += ["## Figures", "", "- `roc.png`: every arm's test ROC curve (seed 0).",
              "- `gan_losses.png`: the CycleGAN losses per step.",
              "- `synthetic_samples.png`: training-split benign sources (left) and their synthetic "
              "malignant translations (right).",
              "- `gradcam_<arm>.png`: where each arm's seed-0 classifier looks (Grad-CAM on its last stage) on "
              "its most confident true positives, false positives and false negatives; "
              "`gradcam_translation_<arm>.png`: the same map on benign sources and their translations.",
              "- `quality/`: the quality stage's pictures (nearest neighbours, distributions, and source → "
              "translation pairs captioned with the criteria the probe says were gained or lost).", ""]
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> Path:
    return atomic_write(path, markdown_report(result))
