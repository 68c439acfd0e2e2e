"""A contact sheet of the synthetic generator: 8 benign and 8 malignant images at 256 px.

    python bench/synth_sheet.py            # -> bench/results/synth_sheet.png (seeded, a few seconds)

Rows 1-2 are benign lesions (one of each benign phenotype first, then the next ones the plan
draws), rows 3-4 melanomas. Under each image: its phenotype and diameter, then the hidden criteria
it carries (melano.lesions; the generator's truth, not a reading of the image):

    ATN   atypical pigment network          (7-point checklist, major: 2 points)
    BWV   blue-whitish veil                 (major: 2)
    AtV   atypical vascular pattern         (major: 2)
    IrS   irregular streaks                 (minor: 1)
    IrD   irregular dots/globules           (minor: 1)
    IrB   irregular blotches                (minor: 1)
    RS    regression structures             (minor: 1)
    7p=N  the 7-point score (>= 3 suggests melanoma)
    Ncol  Stolz's C: how many of white, red, light brown, dark brown, blue-grey, black it shows
    A0-2  Stolz's A: asymmetry of colours and structures about 0, 1 or 2 axes
    asym  the contour itself is asymmetric (else symmetric)
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from melano import lesions, synth  # noqa: E402

ABBREVIATIONS = {"atypical_network": "ATN", "blue_white_veil": "BWV", "atypical_vessels": "AtV",
                 "irregular_streaks": "IrS", "irregular_dots": "IrD", "irregular_blotches": "IrB",
                 "regression": "RS"}
SIZE, COLUMNS, CAPTION = 256, 4, 30


def pick(rows: list[dict], truth: list[dict], per_class: int = 8) -> list[int]:
    """Indices of `per_class` benign rows (each benign phenotype once, then in plan order) and
    `per_class` malignant rows (in plan order)."""
    benign = [i for i, r in enumerate(rows) if r["target"] == "0"]
    first = {}
    for i in benign:
        first.setdefault(truth[i]["phenotype"], i)
    chosen = sorted(first.values())[:per_class]
    chosen += [i for i in benign if i not in chosen][:per_class - len(chosen)]
    malignant = [i for i, r in enumerate(rows) if r["target"] == "1"][:per_class]
    return chosen + malignant


def caption(t: dict) -> tuple[str, str]:
    crit = [a for c, a in ABBREVIATIONS.items() if t[c] == "1"]
    line1 = f"{t['phenotype'].replace('_', ' ')}: {float(t['diameter_mm']):.1f} mm"
    line2 = " ".join(crit + [f"7p={t['seven_point']}", f"{t['n_colours']}col", f"A{t['asymmetry']}"]
                     + (["asym"] if t["contour_asymmetric"] == "1" else []))
    return line1, line2


def sheet(seed: int = 3, per_class: int = 8) -> Image.Image:
    d = synth.DEFAULT_DIFFICULTY
    rows = synth.plan(120, 40, seed=seed, difficulty=d)  # enough nevi for every phenotype
    truth = synth.truth(rows, seed, d)
    idx = pick(rows, truth, per_class)
    chosen = [rows[i] for i in idx]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in synth.render_rows(chosen, SIZE, seed, d)]
    n_rows = -(-len(images) // COLUMNS)
    out = Image.new("RGB", (COLUMNS * SIZE, n_rows * (SIZE + CAPTION)), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, (i, im) in enumerate(zip(idx, images)):
        x, y = (k % COLUMNS) * SIZE, (k // COLUMNS) * (SIZE + CAPTION)
        out.paste(im, (x, y))
        l1, l2 = caption(truth[i])
        colour = (150, 0, 0) if rows[i]["target"] == "1" else (0, 0, 0)
        draw.text((x + 4, y + SIZE + 2), l1, fill=colour, font=font)
        draw.text((x + 4, y + SIZE + 15), l2, fill=colour, font=font)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=3, help="seed of the plan and the images (3)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "synth_sheet.png"))
    args = p.parse_args(argv)
    img = sheet(args.seed)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    if path.stat().st_size > 1_500_000:  # photographic content compresses poorly: 256 colours
        img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    assert set(ABBREVIATIONS) == set(lesions.SEVEN_POINT)


if __name__ == "__main__":
    main()
