"""Small helpers shared by several test files (pytest puts tests/ on sys.path)."""

import csv
import hashlib
import logging
import os
import struct
import time
import zlib
from pathlib import Path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def call(main, argv) -> int:
    """`main(argv)`'s exit code (argparse's own refusals, a SystemExit, included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def refused(caplog, *names) -> str:
    """The one error line logged, which must name each of `names`."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0], errors[0]
    for n in names:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def tree(root) -> dict[str, str]:
    """Every folder ("<rel>/": "") and file ("<rel>": sha256) under `root`; {} if it is absent.
    Equal before and after a command means the command changed nothing there."""
    root = Path(root)
    if not root.exists():
        return {}
    found = {}
    for dirpath, _, filenames in os.walk(root):
        found[os.path.relpath(dirpath, root) + "/"] = ""
        for f in filenames:
            p = Path(dirpath) / f
            found[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def flags(**kw) -> list[str]:
    """Command-line flags from keywords: size=32 -> --size 32, True -> --x, False -> --no-x,
    None -> left out."""
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is False:
            argv.append("--no-" + flag[2:])
        elif v is not None:
            argv += [flag, str(v)]
    return argv


# The smallest trainers that still train: 32 px, a 1-block generator of width 8, a few steps.
GAN = dict(size=32, ngf=8, ndf=8, n_blocks=1, batch_size=4, epochs=1, epochs_decay=1, max_steps=4, pool_size=4,
           sample_every=2, checkpoint_every=1, n_samples=1, workers=0, device="cpu", seed=5)
CLF = dict(size=32, batch_size=8, eval_batch_size=16, max_steps=4, val_every=2, pretrained=False, threads=1,
           workers=0, device="cpu", seed=5)


def gan_train_argv(data, out, **kw) -> list[str]:
    """argv of `python -m melano.cyclegan train` on `data` into `out` (GAN's options, then kw)."""
    return ["train", "--data", str(data), "--out", str(out), *flags(**{**GAN, **kw})]


def clf_train_argv(data, out, **kw) -> list[str]:
    """argv of `python -m melano.classifier train` on `data` into `out` (CLF's options, then kw)."""
    return ["train", "--data", str(data), "--out", str(out), *flags(**{**CLF, **kw})]


def make_data(out, benign: int, malignant: int, seed: int = 3, **kw) -> Path:
    """A synthetic ISIC-layout folder at 32 px (melano.synth)."""
    from melano import synth
    synth.generate(synth.SynthConfig(out=str(out), benign=benign, malignant=malignant, size=32, seed=seed, **kw))
    return Path(out)


def bomb_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit black PNG of w x h pixels, written by hand in chunks: a few kB on disk,
    and never w x h bytes in memory here."""
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 500) for _ in range(h // 500)) + z.compress(row * (h % 500)) + z.flush()
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def wait_until_training(out: Path, proc, seconds: float, output) -> None:
    """Return once the trainer writing `out` has logged 3 steps; fail with `output()` (its log) if
    it exits first, or after `seconds`."""
    losses, deadline = out / "losses.csv", time.monotonic() + seconds
    while time.monotonic() < deadline:
        if losses.exists() and len(losses.read_text().splitlines()) >= 4:
            return
        assert proc.poll() is None, output()
        time.sleep(0.1)
    raise AssertionError(f"training did not start within {seconds:.0f} s")


def trained(main, argv) -> None:
    """Run a trainer's CLI in this process (one thread); it must succeed."""
    import torch
    torch.set_num_threads(1)
    assert call(main, argv) == 0


# isic-cli's metadata.csv header (isic_id, attribution, copyright_license, then the other fields sorted)
ARCHIVE_HEADER = ["isic_id", "attribution", "copyright_license", "age_approx", "anatom_site_general",
                  "diagnosis_1", "diagnosis_2", "diagnosis_3", "image_type", "lesion_id", "patient_id", "sex"]
ARCHIVE_MEL = "Malignant melanocytic proliferations (Melanoma)"


def kaggle_to_archive(kaggle: Path, out: Path) -> Path:
    """A Kaggle-layout folder (train.csv + jpeg/train/, e.g. melano.synth's) rewritten as `isic image
    download` writes the ISIC Archive: one folder of images and a metadata.csv."""
    import shutil
    with open(kaggle / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out.mkdir(parents=True)
    for r in rows:
        shutil.copy(kaggle / "jpeg" / "train" / f"{r['image_name']}.jpg", out / f"{r['image_name']}.jpg")
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ARCHIVE_HEADER)
        w.writerows([[r["image_name"], "melano synth", "CC-0", r["age_approx"], r["anatom_site_general_challenge"],
                      "Malignant" if r["target"] == "1" else "Benign", ARCHIVE_MEL if r["target"] == "1" else "", "",
                      "dermoscopic", "", r["patient_id"], r["sex"]] for r in rows])
    return out
