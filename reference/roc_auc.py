"""Test oracle: ROC AUC and DeLong's variance straight from their definitions, O(m*k).

psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise, for a positive's score x and a negative's y.
AUC = mean psi over all (positive, negative) pairs. DeLong's structural components are the row and
column means of the psi matrix; their sample (co)variances give Var(AUC) = S10/m + S01/k.
"""

import math

import numpy as np


def psi_matrix(pos, neg):
    pos = np.asarray(pos, dtype=np.float64)[:, None]
    neg = np.asarray(neg, dtype=np.float64)[None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def auc(y_true, y_score):
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    total = 0.0
    for x in s[y]:  # one row at a time keeps the memory at O(k)
        total += np.sum(x > s[~y]) + 0.5 * np.sum(x == s[~y])
    return total / (y.sum() * (~y).sum())


def delong_covariance(y_true, *scores):
    """(aucs, covariance matrix of the aucs) for one or more scorers of the same cases."""
    y = np.asarray(y_true).astype(bool)
    m, k = int(y.sum()), int((~y).sum())
    v10, v01, aucs = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        p = psi_matrix(s[y], s[~y])
        aucs.append(p.mean())
        v10.append(p.mean(axis=1))
        v01.append(p.mean(axis=0))
    s10 = np.atleast_2d(np.cov(np.array(v10), ddof=1))
    s01 = np.atleast_2d(np.cov(np.array(v01), ddof=1))
    return np.array(aucs), s10 / m + s01 / k


def delong_p_value(y_true, score_a, score_b):
    aucs, cov = delong_covariance(y_true, score_a, score_b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    return 2.0 * (1.0 - 0.5 * (1.0 + math.erf(abs(z) / math.sqrt(2.0))))
