"""What a synthetic lesion has: its hidden dermoscopic criteria, drawn from its severity.

melano.synth paints them; this module only decides them, and scores them with the published
rules. Each lesion has a hidden severity ``s`` in [0, 1] (nevi draw it from Beta(2, 6), melanomas
from Beta(6, 2)), a phenotype, and each criterion with a probability that rises with ``s``, with
its own intensity and place.

Sources (facts and weights reused, not code):
  - Argenziano G. et al., Arch Dermatol 1998;134:1563-70: the 7-point checklist (`SEVEN_POINT`:
    major criteria 2 points, minor 1; a score of 3 or more suggests melanoma).
  - Stolz W. et al., Eur J Dermatol 1994;4:521-7: the ABCD rule of dermoscopy (`Lesion.tds`;
    below 4.75 benign, above 5.45 melanoma).
  - Menzies S.W. et al., Arch Dermatol 1996;132:1178-82, and the odds ratios of the same
    literature: asymmetry of colour and structure, multicolour and the blue-white veil are the
    strongest single cues, dots/globules the weakest. The criteria's presence rates follow that
    order, none with a single-criterion AUC above 0.80.
  - Size and contour are weak cues: in a large series of melanomas about a third were under 6 mm
    and about a third had a symmetric contour (no primary source is cited here: a design
    assumption). Here about 30% are under 6 mm, about 35% symmetric; diameter alone scores ~AUC 0.6.
  - Benign mimics: seborrhoeic keratosis (milia-like cysts, comedo-like openings, sharp border)
    and solar lentigo (light brown, homogeneous, moth-eaten border); reticular, globular and
    homogeneous nevi; dysplastic nevi that carry one or two criteria.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The seven criteria, in the checklist's order, with their points.
SEVEN_POINT = {"atypical_network": 2, "blue_white_veil": 2, "atypical_vessels": 2, "irregular_streaks": 1,
               "irregular_dots": 1, "irregular_blotches": 1, "regression": 1}
COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_grey", "black")
STRUCTURES = ("network", "structureless", "streaks", "dots", "globules")
BENIGN_PHENOTYPES = {"reticular_nevus": 0.30, "globular_nevus": 0.14, "homogeneous_nevus": 0.12,
                     "dysplastic_nevus": 0.22, "seborrhoeic_keratosis": 0.12, "solar_lentigo": 0.10}

# Presence: sigmoid(a + b (s - 0.5)) per criterion, calibrated (bench/bench_data.py --calibrate)
# so that nevi (s ~ Beta(2, 6)) and melanomas (s ~ Beta(6, 2)) show each at about the rates in the
# comments (benign, melanoma); the phenotypes add to the benign rates.
_PRESENCE = {"atypical_network": (0.1, 4.8),     # ~0.25, 0.75
             "blue_white_veil": (-0.9, 6.4),     # ~0.12, 0.60
             "atypical_vessels": (-2.2, 3.3),    # ~0.05, 0.19
             "irregular_streaks": (-1.5, 3.2),   # ~0.11, 0.33
             "irregular_dots": (-0.5, 1.3),      # ~0.33, 0.45
             "irregular_blotches": (-0.2, 4.2),  # ~0.27, 0.66
             "regression": (-1.2, 3.6)}          # ~0.13, 0.42


@dataclasses.dataclass
class Place:
    """Where a structure sits on the lesion: an offset from the centre, as a fraction of the
    radius along angle `angle` (eccentric in melanomas, central or even in nevi), and its spread."""
    angle: float
    offset: float
    spread: float


@dataclasses.dataclass
class Lesion:
    s: float
    malignant: bool
    phenotype: str
    criteria: dict[str, float]   # criterion -> intensity in (0, 1]; absent criteria are left out
    places: dict[str, Place]     # criterion (or phenotype structure) -> where it sits
    asymmetry: int               # A: 0, 1 or 2 axes of asymmetric colour/structure
    contour_asymmetric: bool
    border_abrupt: int           # B: eighths of the border with an abrupt cut-off
    diameter_mm: float
    base_dark: float             # 0: light brown, 1: dark brown (epidermal melanin)
    dermal: float                # 0..1 dermal (blue-grey) pigment in a homogeneous/blue lesion
    structures: dict[str, bool] = dataclasses.field(default_factory=dict)
    colours: dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def seven_point(self) -> int:
        return sum(w for c, w in SEVEN_POINT.items() if c in self.criteria)

    @property
    def tds(self) -> float:
        """Stolz's total dermoscopy score from the hidden A, B, C and D."""
        c = max(1, sum(self.colours.values()))
        d = max(1, sum(self.structures.values()))
        return 1.3 * self.asymmetry + 0.1 * self.border_abrupt + 0.5 * c + 0.5 * d


def severity(rng: np.random.Generator, malignant: bool, difficulty: float) -> float:
    """The hidden severity: Beta(6, 2) for melanomas, Beta(2, 6) for nevi; with probability
    `difficulty` a lesion draws from the other class's distribution (atypical nevi, featureless
    melanomas)."""
    swapped = rng.random() < difficulty
    return float(rng.beta(6, 2) if malignant != swapped else rng.beta(2, 6))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _place(rng: np.random.Generator, axis: float, asymmetry: int) -> Place:
    """Eccentric around a shared axis when the lesion is asymmetric, else central and even."""
    if asymmetry:
        return Place(axis + rng.normal(0, 0.5), rng.uniform(0.2, 0.45) + 0.05 * asymmetry, rng.uniform(0.35, 0.55))
    return Place(rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.12), rng.uniform(0.55, 0.85))


def draw(rng: np.random.Generator, s: float, malignant: bool) -> Lesion:
    """A lesion's hidden criteria for severity `s`. The draws come in a fixed order: keep it, or
    every seed's images change."""
    phenotype = "melanoma" if malignant else str(rng.choice(list(BENIGN_PHENOTYPES),
                                                             p=list(BENIGN_PHENOTYPES.values())))
    criteria = {c: float(rng.uniform(0.35, 1.0) * (0.6 + 0.4 * s)) for c, (a, b) in _PRESENCE.items()
                if rng.random() < _sigmoid(a + b * (s - 0.5))}
    if phenotype == "dysplastic_nevus" and not criteria:  # atypical nevi carry one or two criteria
        for c in rng.choice(["atypical_network", "irregular_dots", "irregular_blotches"], int(rng.integers(1, 3)),
                            replace=False):
            criteria[str(c)] = float(rng.uniform(0.3, 0.6))
    if phenotype in ("seborrhoeic_keratosis", "solar_lentigo"):  # mimics have no melanocytic network
        criteria.pop("atypical_network", None)
    u = s + rng.normal(0, 0.3)
    asymmetry = 0 if u < 0.5 else 1 if u < 0.75 else 2
    axis = rng.uniform(0, 2 * math.pi)
    places = {c: _place(rng, axis, asymmetry) for c in criteria}
    lesion = Lesion(
        s=s, malignant=malignant, phenotype=phenotype, criteria=criteria, places=places, asymmetry=asymmetry,
        contour_asymmetric=bool(rng.random() < 0.15 + 0.65 * s),
        border_abrupt=int(rng.binomial(8, 0.2 + 0.25 * s)),
        diameter_mm=float(np.clip(rng.lognormal(math.log(6.2) + 0.4 * (s - 0.25), 0.38), 1.5, 25.0)),
        base_dark=float(np.clip(rng.normal(0.35 + 0.2 * s, 0.25), 0, 1)),
        dermal=float(rng.uniform(0.5, 1.0)) if phenotype == "homogeneous_nevus" and rng.random() < 0.3 else 0.0)
    lesion.structures = _structures(lesion)
    lesion.colours = _colours(lesion, rng)
    return lesion


def _structures(les: Lesion) -> dict[str, bool]:
    """Stolz's D: which of the five structures the lesion shows."""
    c, p = les.criteria, les.phenotype
    return {"network": p in ("reticular_nevus", "dysplastic_nevus", "melanoma", "solar_lentigo")
            or "atypical_network" in c,
            "structureless": p in ("homogeneous_nevus", "solar_lentigo") or bool(
                {"blue_white_veil", "irregular_blotches", "regression"} & c.keys()),
            "streaks": "irregular_streaks" in c,
            "dots": "irregular_dots" in c or "regression" in c,
            "globules": p == "globular_nevus" or "irregular_dots" in c or p == "seborrhoeic_keratosis"}


def _colours(les: Lesion, rng: np.random.Generator) -> dict[str, bool]:
    """Stolz's C: the colours the lesion shows, from its pigment and criteria."""
    c = les.criteria
    dark = les.base_dark > 0.45 or "irregular_blotches" in c or "atypical_network" in c
    return {"white": "regression" in c or c.get("blue_white_veil", 0) > 0.6 or les.phenotype == "seborrhoeic_keratosis",
            "red": "atypical_vessels" in c or bool(rng.random() < 0.23),  # or inflamed, in any lesion
            "light_brown": les.base_dark < 0.75 or les.phenotype == "solar_lentigo",
            "dark_brown": dark,
            "blue_grey": "blue_white_veil" in c or "regression" in c or les.dermal > 0,
            "black": "irregular_blotches" in c and c["irregular_blotches"] > 0.5 or "irregular_dots" in c
            and c["irregular_dots"] > 0.7}


def truth_row(les: Lesion) -> dict[str, str]:
    """The lesion as one row of synth_criteria.csv (strings)."""
    row = {"s": repr(les.s), "phenotype": les.phenotype}  # every digit: the oracle recomputes exactly
    for c in SEVEN_POINT:
        row[c] = "1" if c in les.criteria else "0"
        row[f"{c}_intensity"] = f"{les.criteria.get(c, 0.0):.4f}"
    row.update({f"colour_{k}": str(int(v)) for k, v in les.colours.items()})
    row["n_colours"] = str(sum(les.colours.values()))
    row.update({f"structure_{k}": str(int(v)) for k, v in les.structures.items()})
    row.update({"asymmetry": str(les.asymmetry), "contour_asymmetric": str(int(les.contour_asymmetric)),
                "border_abrupt": str(les.border_abrupt), "diameter_mm": f"{les.diameter_mm:.3f}",
                "seven_point": str(les.seven_point), "tds": f"{les.tds:.2f}"})
    return row


TRUTH_COLUMNS = (["s", "phenotype"] + [x for c in SEVEN_POINT for x in (c, f"{c}_intensity")]
                 + [f"colour_{k}" for k in COLOURS] + ["n_colours"] + [f"structure_{k}" for k in STRUCTURES]
                 + ["asymmetry", "contour_asymmetric", "border_abrupt", "diameter_mm", "seven_point", "tds"])
