"""Patient-level bootstrap on one core: melano.stats (vectorised) against a naive loop that
materialises each resample and calls melano.metrics.roc_auc (reference/bootstrap.py).

Default case: 10,000 test images from 625 patients (16 each), 2,000 resamples. Numbers are
checked before any timing: the vectorised replicates equal the loop's on the same draws, and the
two SEs agree within Monte-Carlo error.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before numpy loads its BLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import time_it, write_results  # noqa: E402
from melano import metrics, stats  # noqa: E402
from reference import bootstrap as ref  # noqa: E402


def cpu_isa() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Calibration: float64 n x n matmul throughput, so times from other hosts can be compared."""
    a = np.random.default_rng(0).random((n, n))
    return 2 * n ** 3 / time_it(lambda: a @ a, repeats=repeats) / 1e9


def cpu_seconds(fn) -> float:
    """CPU time of one call: less sensitive than wall time to other jobs on shared cores."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def test_set(n: int, per_patient: int, seed: int = 0):
    """Clustered scores: a patient effect shared by its images; ~2% melanoma images."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // per_patient
    y = rng.random(n) < 0.02
    s = y + rng.normal(size=groups.max() + 1)[groups] + 0.5 * rng.normal(size=n)
    return y, s, groups


def check_numbers(y, s, groups):
    _, codes, strata = stats._prepare(y, groups)
    counts = stats._draw_counts(strata, int(codes.max()) + 1, 20, np.random.default_rng(1))
    got = stats._auc_rows(stats._auc_plan(y, s, codes), counts)
    want = ref.replicate_aucs(y, s, codes, counts, auc=metrics.roc_auc)
    assert np.abs(got - want).max() < 1e-12, np.abs(got - want).max()


def run_case(name, n, per_patient, n_boot, repeats):
    y, s, groups = test_set(n, per_patient)
    check_numbers(y, s, groups)
    fast = stats.cluster_bootstrap_auc(y, s, groups, n_boot=n_boot, seed=0)
    t_fast = time_it(lambda: stats.cluster_bootstrap_auc(y, s, groups, n_boot=n_boot, seed=0),
                     repeats=repeats)
    cpu_fast = cpu_seconds(lambda: stats.cluster_bootstrap_auc(y, s, groups, n_boot=n_boot))
    t0, c0 = time.perf_counter(), time.process_time()
    naive = ref.cluster_bootstrap_aucs(y, s, groups, n_boot, seed=1, auc=metrics.roc_auc)
    t_naive, cpu_naive = time.perf_counter() - t0, time.process_time() - c0
    se_ratio = fast["se"] / naive.std(ddof=1)
    assert abs(se_ratio - 1) < 0.15, se_ratio  # independent streams: MC error ~1.6% each
    a = np.stack([s + 0.3 * np.random.default_rng(k).normal(size=n) for k in range(3)])
    t_arms = time_it(lambda: stats.compare_arms(y, groups, a, a[::-1] * 0.9, n_boot=n_boot),
                     repeats=1, warmup=0)
    t_ops = time_it(lambda: stats.operating_points(y, 1 / (1 + np.exp(-s)), groups,
                                                   n_boot=n_boot), repeats=1, warmup=0)
    row = {"case": name, "n_images": n, "n_patients": int(groups.max()) + 1,
           "n_positives": int(y.sum()), "n_boot": n_boot, "vectorised_s": t_fast,
           "naive_loop_s": t_naive, "speedup": t_naive / t_fast, "vectorised_cpu_s": cpu_fast,
           "naive_loop_cpu_s": cpu_naive, "speedup_cpu": cpu_naive / cpu_fast, "se": fast["se"],
           "se_naive": float(naive.std(ddof=1)), "compare_arms_3v3_s": t_arms,
           "operating_points_s": t_ops}
    print(f"{name:<22}{n:>8}{row['n_patients']:>9}{t_fast:>10.3f}{t_naive:>10.2f}"
          f"{row['speedup']:>9.1f}x{row['speedup_cpu']:>8.1f}x{t_arms:>9.2f}{t_ops:>9.2f}")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=10_000, help="test images")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorised path")
    args = p.parse_args()
    machine = {"isa": cpu_isa(), "loadavg_at_start": os.getloadavg(),
               "omp_num_threads": os.environ["OMP_NUM_THREADS"], "matmul_gflops": matmul_gflops()}
    print(f"ISA {machine['isa']}, load {machine['loadavg_at_start'][0]:.2f}, "
          f"numpy matmul {machine['matmul_gflops']:.1f} GFLOP/s (512^2 float64, one thread)")
    print(f"{'case':<22}{'images':>8}{'patients':>9}{'vector s':>10}{'naive s':>10}"
          f"{'speed-up':>10}{'cpu':>9}{'arms s':>9}{'ops s':>9}")
    rows = [run_case("16 images per patient", args.n, 16, args.n_boot, args.repeats),
            run_case("1 image per patient", args.n, 1, args.n_boot, args.repeats)]
    machine["loadavg_at_end"] = os.getloadavg()
    write_results("bootstrap", {"cpu": machine, "rows": rows})


if __name__ == "__main__":
    main()
