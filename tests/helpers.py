"""Small helpers shared by several test files (pytest puts tests/ on sys.path)."""

import csv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
