"""Test oracle for melano.stats: the cluster bootstrap as a plain loop over replicates.

Each replicate is materialised: the images of every drawn patient, repeated as often as the
patient was drawn, then scored with an ordinary AUC. Slow (O(B * n log n) or O(B * m * k)) and
obviously correct. The weighted AUC comes straight from the pairwise definition.
"""

import math

import numpy as np

from reference import roc_auc as ref


def weighted_auc(y_true, y_score, weights):
    """sum over (positive i, negative j) of w_i w_j psi(s_i, s_j) / (W_pos W_neg)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    psi = ref.psi_matrix(s[y], s[~y])
    return float(w[y] @ psi @ w[~y] / (w[y].sum() * w[~y].sum()))


def resample(codes, counts_row):
    """Image indices of one replicate: each image repeated as often as its patient was drawn."""
    codes = np.asarray(codes)
    return np.repeat(np.arange(codes.size), np.asarray(counts_row)[codes])


def replicate_aucs(y, s, codes, counts, auc=ref.auc):
    """AUC of each materialised replicate, one row of patient counts at a time."""
    y, s = np.asarray(y), np.asarray(s)
    return np.array([auc(y[idx], s[idx]) for idx in (resample(codes, row) for row in counts)])


def cluster_bootstrap_aucs(y, s, groups, n_boot, seed, auc=ref.auc):
    """Naive cluster bootstrap with its own random stream: per replicate, draw patients with
    replacement within 'has a melanoma' and 'has none', gather their images, score them."""
    y, s, groups = np.asarray(y).astype(bool), np.asarray(s), np.asarray(groups)
    patients = {}
    for i, g in enumerate(groups.tolist()):
        patients.setdefault(g, []).append(i)
    strata = [[g for g, idx in patients.items() if y[idx].any() == flag] for flag in (True, False)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = []
        for stratum in strata:
            for k in rng.integers(0, len(stratum), len(stratum)):
                idx.extend(patients[stratum[k]])
        out.append(auc(y[idx], s[idx]))
    return np.array(out)


def seed_mean(aucs_of_seeds, drawn):
    """Mean AUC of the drawn seeds after spreading the K AUCs by sqrt(K/(K-1)) about their mean
    (so that resampling K seeds adds the unbiased s^2/K); NaN for one seed."""
    a = np.asarray(aucs_of_seeds, dtype=np.float64)
    k, mean = a.size, a.mean()
    if k < 2:
        return math.nan
    spread = mean + math.sqrt(k / (k - 1)) * (a - mean)
    return float(np.mean([spread[d] for d in drawn]))


def hierarchical_deltas(y, codes, scores_a, scores_b, counts, draws_a, draws_b, auc=ref.auc):
    """Per replicate: (delta with seeds fixed, delta with the given seed draws), materialised."""
    y = np.asarray(y)
    test, both = [], []
    for row, da, db in zip(counts, draws_a, draws_b):
        idx = resample(codes, row)
        aa = [auc(y[idx], np.asarray(s)[idx]) for s in scores_a]
        ab = [auc(y[idx], np.asarray(s)[idx]) for s in scores_b]
        test.append(np.mean(aa) - np.mean(ab))
        both.append(seed_mean(aa, da) - seed_mean(ab, db))
    return np.array(test), np.array(both)
