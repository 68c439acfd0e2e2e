"""Test oracle: KID straight from its definition, one kernel value at a time (float64, loops).

k(a, b) = (a . b / d + 1)^3. The unbiased MMD^2 of samples X (m) and Y (n):
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n).
KID is its mean (and sample sd, ddof 1) over the given subsets of X and Y.
"""

import math

import numpy as np


def kernel(a, b) -> float:
    d = len(a)
    return (sum(float(u) * float(v) for u, v in zip(a, b)) / d + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def kid(x, y, subsets) -> tuple[float, float]:
    """(mean, sd) of the unbiased MMD^2 over subsets, a list of (rows of x, rows of y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    values = [mmd2_unbiased(x[list(i)], y[list(j)]) for i, j in subsets]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
