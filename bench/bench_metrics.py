"""ROC AUC on 10 million scores: melano.metrics.roc_auc against sklearn.metrics.roc_auc_score."""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import time_it, write_results  # noqa: E402
from melano import metrics  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=10_000_000, help="number of scores")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(args.n) < 0.018  # SIIM-ISIC's melanoma rate
    cases = {
        "continuous": rng.normal(size=args.n) + y,  # float64, nearly no ties
        "float32_probabilities": (1 / (1 + np.exp(-(rng.normal(size=args.n) + y)))).astype(np.float32),
        "heavy_ties": np.round(rng.normal(size=args.n) + y, 1),
    }
    rows = []
    print(f"{'case':<24}{'melano s':>10}{'sklearn s':>11}{'speed-up':>10}")
    for name, s in cases.items():
        ours = metrics.roc_auc(y, s)
        theirs = roc_auc_score(y, s)
        assert abs(ours - theirs) < 1e-12, (name, ours, theirs)  # numbers first, then timing
        t_ours = time_it(lambda: metrics.roc_auc(y, s), repeats=args.repeats)
        t_sk = time_it(lambda: roc_auc_score(y, s), repeats=args.repeats)
        rows.append({"case": name, "n": args.n, "melano_s": t_ours, "sklearn_s": t_sk,
                     "speedup": t_sk / t_ours, "auc": ours})
        print(f"{name:<24}{t_ours:>10.3f}{t_sk:>11.3f}{t_sk / t_ours:>9.2f}x")
    write_results("metrics_roc_auc", {"rows": rows})


if __name__ == "__main__":
    main()
