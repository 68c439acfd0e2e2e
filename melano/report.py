"""The experiment's report: the metrics table with DeLong CIs and paired p-values, report.md,
the ROC plot, and a grid of synthetic malignant images beside their benign sources.

Inputs are the per-arm prediction CSVs that `melano.classifier` writes
(image_name, target, probability), all on the same test split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics
from .common import atomic_write_text

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


def compare_arms(predictions: dict[str, str | Path], baseline: str = "traditional",
                 level: float = 0.95) -> list[dict]:
    """One row per arm: test AUC, DeLong CI, and the paired DeLong p-value against `baseline`.

    Every arm must have scored exactly the same test images with the same labels; anything else
    would make the paired test meaningless, so it is an error."""
    loaded = {arm: read_predictions(p) for arm, p in predictions.items()}
    if baseline not in loaded:
        raise ValueError(f"baseline arm {baseline!r} is missing; have {sorted(loaded)}")
    base_names, base_y, base_p = loaded[baseline]
    order = np.argsort(base_names)
    rows = []
    for arm, (names, y, p) in loaded.items():
        idx = np.argsort(names)
        if sorted(names) != sorted(base_names) or not np.array_equal(y[idx], base_y[order]):
            raise ValueError(f"arm {arm!r} scored a different test set from {baseline!r}: "
                             f"the paired comparison needs identical images and labels")
        auc, low, high = metrics.delong_ci(y, p, level=level)
        p_value = None
        if arm != baseline:
            p_value = metrics.delong_test(y[idx], p[idx], base_p[order])[2]
        rows.append({"name": arm, "test_auc": auc, "ci_low": low, "ci_high": high,
                     f"p_value_vs_{baseline}": p_value,
                     "n_test": int(y.size), "n_test_positive": int(y.sum())})
    return rows


def roc_plot(predictions: dict[str, str | Path], path: str | Path, title: str = "") -> Path | None:
    """Every arm's ROC curve on one plot; None (and a log line) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install -e '.[plot]')", path)
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


def sample_grid(pairs: list[tuple[Image.Image, Image.Image]], path: str | Path, cols: int = 4,
                cell: int = 128) -> Path:
    """Pairs (benign source, synthetic malignant) side by side, `cols` pairs per row."""
    rows = max(1, -(-len(pairs) // cols))
    gap = 4
    grid = Image.new("RGB", (cols * (2 * cell + 3 * gap), rows * (cell + gap) + gap), "white")
    for i, (src, fake) in enumerate(pairs):
        x0 = (i % cols) * (2 * cell + 3 * gap) + gap
        y0 = (i // cols) * (cell + gap) + gap
        grid.paste(src.convert("RGB").resize((cell, cell)), (x0, y0))
        grid.paste(fake.convert("RGB").resize((cell, cell)), (x0 + cell + gap, y0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def markdown_report(result: dict) -> str:
    """report.md: reads like the study's results section, with this run's numbers."""
    arms = result["arms"]
    split = result.get("split_sizes", {})
    lines = [
        "# melano experiment report",
        "",
        f"Data: `{result.get('data', '?')}`. Preset: `{result.get('preset', '?')}`. "
        f"Classifier: `{result.get('arch', '?')}` at {result.get('size', '?')} px.",
        "",
        "## Results",
        "",
        "Test ROC AUC of each arm on the same held-out, patient-grouped test split, with DeLong 95% "
        "confidence intervals and the two-sided paired DeLong test against traditional augmentation.",
        "",
        "| arm | test AUC | 95% CI | Δ vs traditional | p vs traditional | study reported |",
        "|---|---|---|---|---|---|",
    ]
    base = next((a for a in arms if a["name"] == "traditional"), None)
    for a in arms:
        delta = "—" if base is None or a is base else f"{a['test_auc'] - base['test_auc']:+.3f}"
        lines.append(f"| {a['name']} | {a['test_auc']:.3f} | {a['ci_low']:.3f}–{a['ci_high']:.3f} | "
                     f"{delta} | {_fmt_p(a.get('p_value_vs_traditional'))} | "
                     f"{STUDY_AUC.get(a['name'], '—')} |")
    lines += ["", _verdict(arms), "",
              f"Each p-value is one paired test against `traditional`; with {len(arms) - 1} such tests, "
              f"a Bonferroni-corrected threshold is {0.05 / max(1, len(arms) - 1):.3g} for a 5% "
              f"family-wise error rate.", ""]
    if split:
        lines += ["## Data and split", "",
                  "| split | images | malignant | patients |", "|---|---|---|---|"]
        for name, s in split.items():
            lines.append(f"| {name} | {s['images']} | {s['malignant']} | {s['patients']} |")
        lines.append("")
    guards = result.get("leakage_guards", {})
    if guards:
        lines += ["## Leakage guards", ""]
        lines += [f"- {text}: **{'yes' if ok else 'NO'}**" for text, ok in guards.items()]
        lines.append("")
    timings = result.get("timings_s", {})
    if timings:
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        lines.append("")
    lines += ["## Figures", "", "- `roc.png`: every arm's test ROC curve.",
              "- `gan_losses.png`: the CycleGAN losses per step.",
              "- `synthetic_samples.png`: training-split benign sources (left) and their synthetic "
              "malignant translations (right).", ""]
    return "\n".join(lines)


def _verdict(arms: list[dict]) -> str:
    """One honest sentence per CycleGAN arm: better, worse, or no detectable difference."""
    base = next((a for a in arms if a["name"] == "traditional"), None)
    if base is None:
        return ""
    out = []
    for a in arms:
        p = a.get("p_value_vs_traditional")
        if a is base or p is None:
            continue
        d = a["test_auc"] - base["test_auc"]
        if p < 0.05:
            word = "higher" if d > 0 else "lower"
            out.append(f"`{a['name']}` scored a {word} test AUC than `traditional` "
                       f"({d:+.3f}, p = {_fmt_p(p)}).")
        else:
            out.append(f"`{a['name']}` did not differ detectably from `traditional` "
                       f"({d:+.3f}, p = {_fmt_p(p)}); this test split cannot tell them apart.")
    return " ".join(out)


def write_report(result: dict, path: str | Path) -> Path:
    atomic_write_text(markdown_report(result), path)
    return Path(path)
