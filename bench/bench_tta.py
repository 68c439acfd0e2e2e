"""What test-time augmentation buys on the built-in test split (issue 25): 4 views (the flips) and
8 (the dihedral group), each against the image alone, for one arm's classifiers of a finished run.

Each seed's best.pt scores the run's test split three times. The gain is the mean over seeds of
the AUC with TTA minus without, with the paired hierarchical bootstrap of `melano.stats.compare_arms`
(test patients, then seeds): the same test images, the same checkpoints, only the views differ.
Writes bench/results/tta.json.

    python bench/bench_tta.py runs/quick                 # after `make train`; the oversample arm
    python bench/bench_tta.py runs/quick --arm cyclegan
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano import classifier, data, stats  # noqa: E402
from melano.detector import sigmoid  # noqa: E402
from melano.report import test_patients  # noqa: E402

VIEWS = (1, 4, 8)


def test_images(run: Path, checkpoint: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, labels, patients, uint8 images at the classifier's size) of the run's test split."""
    cfg = json.loads((checkpoint.parent / "config.json").read_text())
    size = classifier.load_classifier(checkpoint, "cpu")[2]["image_size"]
    cache = data.build_cache(data.read_index(cfg["data"], negatives=cfg.get("negatives", "all")), size,
                             cfg["cache_dir"])
    names = sorted(data.load_split(cfg["split_csv"], cache)["test"])
    rows = cache.rows(names)
    return names, cache.targets[rows], test_patients(cfg["split_csv"], names), np.asarray(cache.images)[rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished pipeline run folder (e.g. runs/quick)")
    p.add_argument("--arm", default="oversample", help="whose seeds to score (default oversample)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap draws (default 2000)")
    args = p.parse_args()
    run = Path(args.run)
    checkpoints = sorted(run.glob(f"arm_{args.arm}_*/best.pt"))
    if not checkpoints:
        sys.exit(f"{run}: no arm_{args.arm}_*/best.pt; run the pipeline first")
    names, y, groups, images = test_images(run, checkpoints[0])
    probs, seconds = {}, {}
    for n in VIEWS:
        t0 = time.perf_counter()
        probs[n] = np.stack([sigmoid(classifier.score_arrays(c, images, tta=n)) for c in checkpoints])
        seconds[n] = time.perf_counter() - t0
    rows = {}
    for n in VIEWS[1:]:
        c = stats.compare_arms(y, groups, probs[n], probs[1], n_boot=args.boot, seed=n)
        rows[f"{n}_views"] = {"auc": c["auc_a"], "auc_without": c["auc_b"], "gain": c["delta"], "ci": c["ci"],
                              "p": c["p"], "covers": c["covers"], "seconds": seconds[n],
                              "seconds_without": seconds[1]}
        print(f"{n} views: AUC {c['auc_a']:.4f} vs {c['auc_b']:.4f} without: gain {c['delta']:+.4f} "
              f"(95% CI {c['ci'][0]:+.4f} to {c['ci'][1]:+.4f}, p {c['p']:.2g}); {seconds[n] / seconds[1]:.1f}x the time")
    write_results("tta", {"run": str(run), "arm": args.arm, "seeds": len(checkpoints), "test_images": len(names),
                          "test_malignant": int(y.sum()), "test_patients": int(len(set(groups))), "views": rows})


if __name__ == "__main__":
    main()
