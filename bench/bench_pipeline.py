"""Wall time of the whole experiment, per stage: `python -m melano.pipeline --preset quick`.

Runs the preset into a fresh folder (or, with --from-run, reads a finished run's metrics.json)
and writes bench/results/pipeline_<preset>.json with each stage's seconds and the arms' AUCs.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_results  # noqa: E402
from melano import pipeline  # noqa: E402
from melano.common import setup_logging  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="quick", choices=sorted(pipeline.PRESETS))
    p.add_argument("--from-run", default=None, help="a finished run folder (e.g. runs/quick after `make train`) "
                                                    "to record instead of running")
    args = p.parse_args()
    setup_logging()
    if args.from_run:
        result = json.loads((Path(args.from_run) / "metrics.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as out:
            result = pipeline.run_experiment(pipeline.make_config(args.preset, out=out))
    print(f"{'stage':<18}{'seconds':>9}")
    for stage, sec in result["timings_s"].items():
        print(f"{stage:<18}{sec:>9.0f}")
    print(f"{'pipeline wall':<18}{result['wall_s']:>9.0f}")
    budget = 15 * 60 if args.preset == "quick" else None  # the quick preset's promise on 2 CPU cores
    if budget:
        print(f"wall / 15-minute budget: {result['wall_s'] / budget:.2f}")
    arms = {a["name"]: {"auc_mean": a["auc_mean"], "auc_sd": a["auc_sd"], "steps": a.get("steps"),
                        "seeds": [{k: s[k] for k in ("auc", "ci_low", "ci_high", "clustered_ci")} for s in a["seeds"]]}
            for a in result["arms"]}
    write_results(f"pipeline_{args.preset}", {
        "preset": args.preset, "stage_seconds": result["timings_s"], "wall_s": result["wall_s"],
        "budget_s": budget, "wall_over_budget": budget and result["wall_s"] / budget,
        "host_at_run_start": result.get("host"), "split_sizes": result["split_sizes"], "arms": arms,
        "comparisons": result["comparisons"]})


if __name__ == "__main__":
    main()
