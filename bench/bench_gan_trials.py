"""Choosing the quick preset's CycleGAN by the quality stage, not by the arms' AUC (issue 22).

Each trial runs the pipeline on one shared built-in data set with only the `cyclegan` arm and one
GAN run (seed 0), so the quality stage scores that GAN's translations: distances to real
melanomas, translation success, the hidden-severity shift, and the criterion probe (which
dermoscopic structures the translations gain). The classifier arm it also trains is not used.
Writes bench/results/gan_trials.json: per trial the GAN's settings, its stage seconds (with the
load average: a busy machine inflates them; bench_cyclegan.py times the step itself) and its
quality figures.

    python bench/bench_gan_trials.py                 # the default trials, ~2-3 min each on 2 cores
    python bench/bench_gan_trials.py --trial 48:16:3:250 --trial 64:16:3:250   # size:ngf:blocks:steps
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import host_info, write_results  # noqa: E402
from melano import pipeline, synth  # noqa: E402
from melano.infra.cli import setup_logging  # noqa: E402

DEFAULT_TRIALS = ("48:16:3:500", "48:16:3:250", "64:16:3:250", "48:16:2:350")
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "gan_trials.json"


def parse_trial(text: str) -> dict:
    size, ngf, blocks, steps = (int(v) for v in text.split(":"))
    return {"gan_size": size, "gan_ngf": ngf, "gan_ndf": ngf, "gan_n_blocks": blocks, "gan_max_steps": steps}


def shared_data(root: Path) -> Path:
    """The quick preset's built-in data set, written once for every trial."""
    cfg = pipeline.make_config("quick")
    folder = root / "data"
    synth.generate(synth.SynthConfig(out=str(folder), benign=cfg.synth_benign, malignant=cfg.synth_malignant,
                                     size=cfg.synth_size, seed=cfg.seed, difficulty=cfg.synth_difficulty,
                                     workers=os.cpu_count() or 1))
    return folder


def figures(q: dict) -> dict:
    """The quality stage's headline figures of the one GAN run, and what the probe can see."""
    probe = q.get("criteria_probe") or {}
    return {"run": q["runs"]["cyclegan"]["mean"],
            "probe_val_auc": {c: p.get("auc_val") for c, p in probe.get("criteria", {}).items()},
            "probe_can_see": [c for c, p in probe.get("criteria", {}).items() if p.get("can_see")]}


def run_trial(data: Path, out: Path, settings: dict) -> dict:
    cfg = pipeline.make_config("quick", data=str(data), out=str(out), arms=["cyclegan"], seeds=1, **settings)
    load = list(os.getloadavg())
    t0 = time.monotonic()
    result = pipeline.run_experiment(cfg)
    return {"settings": settings, "data": {"benign": cfg.synth_benign, "malignant": cfg.synth_malignant,
                                           "size": cfg.synth_size}, "gan_seconds": result["timings_s"]["gan_0"],
            "quality_seconds": result["timings_s"].get("quality"), "wall_s": time.monotonic() - t0,
            "load_average_at_start": load, **figures(result["synthetic_quality"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", action="append", help="size:ngf:blocks:steps (repeatable; default: "
                                                     f"{' '.join(DEFAULT_TRIALS)})")
    p.add_argument("--append", action="store_true", help="add these trials to bench/results/gan_trials.json")
    args = p.parse_args()
    setup_logging()
    trials = [parse_trial(t) for t in (args.trial or DEFAULT_TRIALS)]
    host = host_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = shared_data(Path(tmp))
        for i, settings in enumerate(trials):
            rows.append(run_trial(data, Path(tmp) / f"trial{i}", settings))
            r = rows[-1]
            print(json.dumps({k: r[k] for k in ("settings", "gan_seconds", "probe_can_see")}))
    if args.append and RESULTS_FILE.exists():  # earlier trials kept, each with the host state it ran under
        earlier = json.loads(RESULTS_FILE.read_text())["trials"]
        rows = earlier + [dict(r, host_at_start=host) for r in rows]
    write_results("gan_trials", {"host_at_start": host, "trials": rows})


if __name__ == "__main__":
    main()
