"""melano.infra.dist and the trainers under torchrun: 2 CPU processes with gloo, on loopback only.

Oracles: one process on the whole batch (DDP's averaged gradients of a CycleGAN step with its
several forwards per module), torch's DistributedSampler (how shards and padding are laid out),
scikit-learn's roc_auc_score on the union of every rank's validation predictions, each rank's own
weights (equal after training, and equal to rank 0's checkpoint), and a plain single-process run
(torchrun with one process must not change a bit).

Each trainer test launches `python -m torch.distributed.run --standalone` with this file as the
worker script (see `worker` at the bottom): it runs the module's CLI and then saves what its rank
holds for the test to compare.
"""

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import read_csv, wait_until_training
from melano.infra import dist

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- launching

def torchrun_cmd(nproc: int, *argv: str) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MELANO_TEST_RANK_FILES": ""}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback too
    # --standalone: a rendezvous on localhost with a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    return cmd, env


def torchrun(nproc: int, *argv: str, probe: Path | None = None, timeout: float = 150) -> str:
    """Run argv under torchrun; return its output; fail the test with that output if it fails."""
    cmd, env = torchrun_cmd(nproc, *argv)
    if probe is not None:
        env["MELANO_TEST_RANK_FILES"] = str(probe)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (SIGKILL would orphan them)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"torchrun timed out after {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def worker_cmd(mode: str, *args: str) -> list[str]:
    return [__file__, mode, *args]


@pytest.fixture(scope="module", autouse=True)
def built_ops():
    from melano.infra import kernels
    kernels.build()  # compile (or find) the fused op once, not in two racing children


def files_under(folder: Path) -> list[str]:
    """The run's own files (not melano.infra.outdir's owner, manifest and lock files)."""
    from melano.infra import outdir
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in outdir.MELANO_FILES)


# ----------------------------------------------------------------------------- helpers, no processes

def test_shard_matches_distributed_sampler(monkeypatch):
    order = list(np.random.default_rng(0).permutation(11))
    for world in (1, 2, 3, 4):
        shards = []
        for r in range(world):
            monkeypatch.setattr(dist, "world_size", lambda: world)
            monkeypatch.setattr(dist, "rank", lambda: r)
            positions = list(torch.utils.data.DistributedSampler(range(11), world, r, shuffle=False))
            assert dist.shard(order) == [order[i] for i in positions]
            cut = list(torch.utils.data.DistributedSampler(range(11), world, r, shuffle=False, drop_last=True))
            assert dist.shard(order, drop_last=True) == [order[i] for i in cut]
            shards.append(dist.shard(order, drop_last=True))
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == 11 // world * world  # disjoint shards


def test_gather_shards_drops_the_padding(monkeypatch):
    n, world = 10, 3  # padded to 12: items 0 and 1 twice
    parts = []
    for r in range(world):
        idx = list(torch.utils.data.DistributedSampler(range(n), world, r, shuffle=False))
        parts.append((np.asarray(idx), np.asarray(idx) * 1.5, np.asarray(idx) % 2))
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: parts)
    values, labels = dist.gather_shards(parts[0][0], n, parts[0][1], parts[0][2])
    assert values.tolist() == [i * 1.5 for i in range(n)] and labels.tolist() == [i % 2 for i in range(n)]
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: parts[:2])  # a rank's share is missing
    with pytest.raises(RuntimeError, match="distinct items"):
        dist.gather_shards(parts[0][0], n, parts[0][1])


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_from_env("cpu") == torch.device("cpu") and dist.world_size() == 1 and dist.is_main()
    m = nn.Linear(2, 2)
    assert dist.wrap_ddp(m, torch.device("cpu")) is m and dist.unwrap(m) is m
    assert dist.rank_seed(7) == 7 and dist.max_int(3) == 3 and dist.mean({"a": 1.5}) == {"a": 1.5}
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.rank_seed(7) != 7


# ----------------------------------------------------------------------------- one CycleGAN step

def step_setup():
    from melano import cyclegan as cg, gan
    cfg = cg.CycleGANConfig(size=32, ngf=8, ndf=8, n_blocks=1, batch_size=2, pool_size=0, label_smoothing="none")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1)
               for _ in range(3)]
    torch.manual_seed(0)
    m = gan.build_models(cfg)
    opt_G = torch.optim.SGD([*m["G_A"].parameters(), *m["G_B"].parameters()], lr=1e-4)
    opt_D = torch.optim.SGD([*m["D_A"].parameters(), *m["D_B"].parameters()], lr=1e-4)
    pool = gan.ImagePool(0, torch.Generator())
    return cg, cfg, batches, m, opt_G, opt_D, pool


def run_steps(net, m, opt_G, opt_D, pool, cfg, batches, part: slice) -> list[dict]:
    from melano import gan
    from melano.infra.precision import Precision
    grads = []
    for a, b in batches:
        state = gan.GAN(m, opt_G, opt_D, pool, pool, torch.Generator(), Precision("none", torch.device("cpu")), net)
        gan.train_step(state, (a[part], b[part]), cfg)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    return grads


def test_ddp_cyclegan_step_equals_one_process_on_the_whole_batch(tmp_path):
    # Each generator runs three forwards per step and each discriminator two, with one backward per
    # phase; the generator step calls the frozen discriminators unwrapped. With 2 ranks on half the
    # batch each, DDP's averaged gradients must be those of one process on the whole batch (every
    # loss is a mean and InstanceNorm is per image), for all 3 steps (the reducer is reused). A small
    # SGD rate keeps the two runs' weights close (the GAN's gradients are large).
    torchrun(2, *worker_cmd("step"), probe=tmp_path, timeout=120)
    cg, cfg, batches, m, opt_G, opt_D, pool = step_setup()
    want = run_steps(m, m, opt_G, opt_D, pool, cfg, batches, slice(None))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert len(got) == 3
        for step, (g, w) in enumerate(zip(got, want)):
            assert g.keys() == w.keys() and len(g) == sum(1 for _ in m.parameters())
            for k in w:  # (conv biases before an InstanceNorm have zero gradient, up to rounding)
                assert (g[k] - w[k]).norm() <= 1e-4 * w[k].norm() + 1e-5, (r, step, k)


# ----------------------------------------------------------------------------- CycleGAN trainer

@pytest.fixture(scope="module")
def gan_data(tmp_path_factory):
    from melano import synth
    root = tmp_path_factory.mktemp("dist_gan")
    synth.generate(synth.SynthConfig(out=str(root / "data"), benign=40, malignant=20, size=32, seed=3))
    return root


def gan_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(root / "data"), "--out", str(out), "--split-csv", str(root / "splits.csv"),
            "--cache-dir", str(root / "cache"), "--size", "32", "--ngf", "8", "--ndf", "8", "--n-blocks", "1",
            "--batch-size", "4", "--epochs", "1", "--epochs-decay", "2", "--pool-size", "4",
            "--label-smoothing", "noisy", "--sample-every", "3", "--checkpoint-every", "1000",
            "--n-samples", "2", "--workers", "0", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def gan_run(gan_data):
    out = gan_data / "two"
    probe = gan_data / "probe_two"
    log = torchrun(2, *worker_cmd("cyclegan", *gan_args(gan_data, out, "--max-steps", "6")), probe=probe)
    return out, probe, log


def test_cyclegan_two_processes(gan_data, gan_run):
    from melano import cyclegan as cg
    from melano.infra.checkpoints import load_checkpoint
    out, probe, log = gan_run
    # parameters are equal on both ranks, and equal to the one checkpoint rank 0 wrote
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(2)]
    state = load_checkpoint(out / cg.CHECKPOINT)
    for k in ranks[0]["models"]:
        assert torch.equal(ranks[0]["models"][k], ranks[1]["models"][k]), k
        net, name = k.split(".", 1)
        assert torch.equal(ranks[0]["models"][k], state[net][name]), k
    # exactly the files of one run: one checkpoint, one loss row per step, no temp files
    assert files_under(out) == ["checkpoint.pt", "config.json", "losses.csv", "losses.png",
                                "samples/step_0000003.png", "samples/step_0000006.png"]
    rows = read_csv(out / "losses.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    # each step took 2 x 4 images: an epoch of max(|A|, |B|) images has ceil(n / 8) steps
    data = cg.TrainData(cg.config_from_checkpoint(state))
    n = max(data.n_A, data.n_B)
    assert [int(r["epoch"]) for r in rows] == [s // -(-n // 8) for s in range(6)]
    # the printed and saved config state the global batch; per-rank pools and streams are all saved
    saved = json.loads((out / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["global_batch_size"] == 8 and saved["batch_size"] == 4
    assert re.search(r"global_batch_size\s+= 8", log)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["step"] == 6
    pools = [s["pool_A"]["images"] for s in state["ranks"]]
    assert pools[0].shape == pools[1].shape == (4, 3, 32, 32) and not torch.equal(pools[0], pools[1])
    assert not torch.equal(state["ranks"][0]["rng"]["generators"][0], state["ranks"][1]["rng"]["generators"][0])
    assert torch.equal(state["ranks"][0]["pool_A"]["images"], state["pool_A"]["images"])
    assert log.count("step 3/6") == 1  # only rank 0 logs at INFO level


def test_cyclegan_two_processes_resume_exactly(gan_data, gan_run):
    from melano import cyclegan as cg
    from melano.infra.checkpoints import load_checkpoint
    out = gan_data / "two_resumed"
    torchrun(2, "-m", "melano.cyclegan", "train", *gan_args(gan_data, out, "--max-steps", "4"))
    torchrun(2, "-m", "melano.cyclegan", "train", *gan_args(gan_data, out, "--max-steps", "6", "--resume"))
    a, b = load_checkpoint(gan_run[0] / cg.CHECKPOINT), load_checkpoint(out / cg.CHECKPOINT)
    for net in ("G_A", "G_B", "D_A", "D_B"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for r in range(2):
        assert torch.equal(a["ranks"][r]["pool_B"]["images"], b["ranks"][r]["pool_B"]["images"])
        assert torch.equal(a["ranks"][r]["rng"]["generators"][0], b["ranks"][r]["rng"]["generators"][0])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_csv(gan_run[0] / "losses.csv")) == drop(read_csv(out / "losses.csv"))
    # resuming with another number of processes is refused, naming the fix
    from melano import cyclegan
    with pytest.raises(ValueError, match="same number of processes"):
        cyclegan.train(cyclegan.CycleGANConfig(**{**a["config"], "out": str(out), "max_steps": 8, "resume": True}))


def test_torchrun_with_one_process_equals_the_plain_run(gan_data, tmp_path):
    from melano import cyclegan as cg
    from melano.infra.checkpoints import load_checkpoint
    torchrun(1, "-m", "melano.cyclegan", "train", *gan_args(gan_data, tmp_path / "torchrun", "--max-steps", "3"))
    from melano.infra import options
    args = argparse.ArgumentParser()
    options.add_options(args, cg.CycleGANConfig)
    cfg = options.from_args(cg.CycleGANConfig, args.parse_args(gan_args(gan_data, tmp_path / "plain", "--max-steps", "3")))
    a, b = load_checkpoint(tmp_path / "torchrun" / cg.CHECKPOINT), load_checkpoint(cg.train(cfg))
    for net in ("G_A", "G_B", "D_A", "D_B"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert torch.equal(a["pool_A"]["images"], b["pool_A"]["images"]) and a["world_size"] == 1 and "ranks" not in a


def test_sigterm_to_torchrun_saves_one_checkpoint(gan_data, tmp_path):
    from melano import cyclegan as cg
    from melano.infra.checkpoints import load_checkpoint
    out = tmp_path / "sig"
    cmd, env = torchrun_cmd(2, "-m", "melano.cyclegan", "train",
                            *gan_args(gan_data, out, "--epochs", "1000", "--sample-every", "1000"))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would block the workers
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until_training(out, proc, 90, lambda: log.read_text()[-3000:])
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    state = load_checkpoint(out / cg.CHECKPOINT)
    rows = read_csv(out / "losses.csv")
    assert state["step"] >= 3 and state["step"] == len(rows) == int(rows[-1]["step"]), err[-3000:]
    assert len(state["ranks"]) == 2 and files_under(out) == ["checkpoint.pt", "config.json", "losses.csv",
                                                             "losses.png"]
    assert "stopped by SIGTERM" in err


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_fused_kernels_under_ddp_and_amp_on_cuda(tmp_path, monkeypatch, amp):
    # The fused op's autograd inside DDP's gradient hooks and buckets, under autocast (and fp16's
    # GradScaler): one NCCL process, so it runs on a one-GPU machine; the losses must be those of
    # the same models unwrapped.
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    from melano import cyclegan as cg
    from melano import gan, ops
    from melano.infra import precision
    monkeypatch.setenv("MELANO_OPS", "ext")
    if ops.backend("cuda") != "ext":
        pytest.skip("no CUDA kernel built")
    cfg = cg.CycleGANConfig(size=64, ngf=8, ndf=8, n_blocks=2, batch_size=2, amp=amp, device="cuda", pool_size=4,
                            label_smoothing="noisy")
    dtype, _ = precision.amp_setup(cfg.amp, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.rand(2, 3, 64, 64, generator=g).cuda() * 2 - 1 for _ in "AB") for _ in range(3)]
    tdist.init_process_group("nccl", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                             device_id=torch.device("cuda", torch.cuda.current_device()))
    losses = {}
    try:
        for wrapped in (False, True):
            torch.manual_seed(0)
            m = gan.build_models(cfg).cuda()
            net = nn.ModuleDict({k: DistributedDataParallel(m[k]) for k in m}) if wrapped else m
            opt_G = torch.optim.Adam([*m["G_A"].parameters(), *m["G_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
            opt_D = torch.optim.Adam([*m["D_A"].parameters(), *m["D_B"].parameters()], lr=2e-4, betas=(0.5, 0.999))
            rng = torch.Generator().manual_seed(1)
            state = gan.GAN(m, opt_G, opt_D, gan.ImagePool(4, rng), gan.ImagePool(4, rng), rng,
                            precision.Precision(cfg.amp, torch.device("cuda")), net)
            assert state.amp.dtype == dtype
            if amp == "fp16":
                state.amp.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
            losses[wrapped] = [gan.train_step(state, (a, b), cfg) for a, b in batches]
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    finally:
        tdist.destroy_process_group()
    for plain, ddp in zip(losses[False], losses[True]):
        for k in plain:
            assert np.isfinite(ddp[k]) and ddp[k] == pytest.approx(plain[k], rel=5e-2, abs=1e-3), k


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cyclegan_on_two_gpus(gan_data):
    out, probe = gan_data / "gpus", gan_data / "probe_gpus"
    torchrun(2, *worker_cmd("cyclegan", *gan_args(gan_data, out, "--max-steps", "4", "--device", "cuda",
                                                  "--amp", "bf16")), probe=probe)
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(2)]
    for k in ranks[0]["models"]:
        assert torch.equal(ranks[0]["models"][k], ranks[1]["models"][k]), k


# ----------------------------------------------------------------------------- classifier trainer

@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    from melano.synth import SynthConfig, generate
    root = tmp_path_factory.mktemp("dist_cls")
    generate(SynthConfig(out=str(root / "data"), benign=50, malignant=30, size=32, seed=3, images_per_patient=3.0))
    return root


def test_classifier_two_processes(cls_data):
    from sklearn.metrics import roc_auc_score
    out, probe = cls_data / "two", cls_data / "probe"
    args = ["--data", str(cls_data / "data"), "--out", str(out), "--split-csv", str(cls_data / "splits.csv"),
            "--cache-dir", str(cls_data / "cache"), "--size", "32", "--batch-size", "8", "--eval-batch-size", "4",
            "--max-steps", "4", "--val-every", "2", "--threads", "1", "--workers", "0",
            "--seed", "5", "--augment", "traditional"]
    log = torchrun(2, *worker_cmd("classifier", *args), probe=probe)
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(2)]
    last = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    # weights and BatchNorm statistics equal on both ranks and in rank 0's last.pt
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k]) and torch.equal(v, last["model"][k]), k
    assert last["world_size"] == 2 and len(last["ranks"]) == 2 and last["step"] == 4

    # validation: 15 images, so the sampler padded rank 1's share with image 0
    val_names = [r["image_name"] for r in read_csv(cls_data / "splits.csv") if r["split"] == "val"]
    labels = {r["image_name"]: int(r["target"]) for r in read_csv(cls_data / "data" / "train.csv")}
    assert len(val_names) == 15
    history = read_csv(out / "history.csv")
    assert [int(h["step"]) for h in history] == [2, 4]  # every --val-every 2 steps (and at the last)
    for i, h in enumerate(history):
        idx, logits, targets = (np.concatenate([ranks[r]["val"][i][j].numpy() for r in range(2)]) for j in range(3))
        assert sorted(idx.tolist()) == sorted(list(range(15)) + [0])  # the union, padding included
        assert len(ranks[0]["val"][i][0]) == len(ranks[1]["val"][i][0]) == 8
        keep = np.unique(idx, return_index=True)[1]  # each image once
        auc = roc_auc_score(targets[keep], logits[keep])
        assert float(h["val_auc"]) == pytest.approx(auc, abs=1e-6)
        if int(h["step"]) == last["best_step"]:
            assert last["best_auc"] == pytest.approx(auc, abs=1e-12)
            # val_predictions.csv: every validation image once, in split order, with the union's scores
            val = read_csv(out / "val_predictions.csv")
            assert [r["image_name"] for r in val] == val_names
            assert [int(r["target"]) for r in val] == [labels[n] for n in val_names]
            probs = 1 / (1 + np.exp(-logits[keep][np.argsort(idx[keep])]))  # as classifier.sigmoid
            assert [float(r["probability"]) for r in val] == probs.tolist()
    # one run's files: a single last.pt and best.pt, one history row per validation
    assert files_under(out) == ["best.pt", "config.json", "history.csv", "last.pt", "result.json",
                                "test_metrics.json", "test_predictions.csv", "val_predictions.csv"]
    assert json.loads((out / "config.json").read_text())["global_batch_size"] == 16
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and result["best_val_auc"] == last["best_auc"]
    assert log.count('"best_val_auc"') == 1  # rank 0 alone prints the result


# ----------------------------------------------------------------------------- the pipeline

def test_pipeline_runs_its_training_stages_under_torchrun(tmp_path, monkeypatch):
    from sklearn.metrics import roc_auc_score
    from melano import pipeline
    from melano.infra.checkpoints import load_checkpoint
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if Path("/sys/class/net/lo").exists():
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    cfg = pipeline.make_config("smoke", out=str(tmp_path), arms=["traditional", "cyclegan"], nproc_per_node=2,
                               seeds=1)
    result = pipeline.run_experiment(cfg)
    gan = load_checkpoint(tmp_path / "gan_0" / "checkpoint.pt")
    assert gan["world_size"] == 2 and gan["step"] == cfg.gan.max_steps
    assert json.loads((tmp_path / "gan_0" / "params.json").read_text())["params"]["nproc_per_node"] == 2
    # the report read each arm's outputs, written by rank 0 of its torchrun
    for arm in result["arms"]:
        assert load_checkpoint(tmp_path / f"arm_{arm['name']}_0" / "last.pt")["world_size"] == 2
        test = read_csv(tmp_path / f"arm_{arm['name']}_0" / "test_predictions.csv")
        auc = roc_auc_score([int(r["target"]) for r in test], [float(r["probability"]) for r in test])
        assert arm["seeds"][0]["auc"] == pytest.approx(auc, abs=1e-9)
    assert sorted(a["name"] for a in result["arms"]) == ["cyclegan", "traditional"]


def test_pipeline_passes_configs_to_torchrun_unchanged():
    # --nproc-per-node K runs each training stage as `torchrun ... -m MODULE train FLAGS`: the flags
    # must parse back, through each module's own parser, into exactly the config of the in-process call
    import argparse
    from melano import classifier, cyclegan, pipeline
    from melano.infra import options
    gan = cyclegan.CycleGANConfig(data="d", out="o", split_csv="s.csv", size=64, n_blocks=3, max_steps=None,
                                  label_smoothing="noisy", lr=3e-4, resume=True, device="cuda")
    clf = classifier.ClassifierConfig(data="d", out="o", extra=["x", "y"], split_csv="s.csv", pretrained=False,
                                      size=None, max_steps=7, lr=1e-3, augment="traditional", evaluate=False,
                                      channels_last=False, amp="none", tta=True, resume=True, pos_weight="auto")
    for cfg in (gan, clf, dataclasses.replace(clf, extra=[], size=48, resume=False)):
        p = argparse.ArgumentParser()
        options.add_options(p, type(cfg))
        assert options.from_args(type(cfg), p.parse_args(options.to_flags(cfg))) == cfg
    assert pipeline.PipelineConfig().nproc_per_node == 1


# ----------------------------------------------------------------------------- the worker

def worker(mode: str, args: list[str]) -> int:
    """One torchrun process: run a trainer's CLI (or DDP steps), then save what this rank holds to
    $MELANO_TEST_RANK_FILES/rank<RANK>.pt."""
    probe = Path(os.environ["MELANO_TEST_RANK_FILES"])
    probe.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if mode == "step":
        device = dist.init_from_env("cpu")
        cg, cfg, batches, m, opt_G, opt_D, pool = step_setup()
        net = nn.ModuleDict({k: dist.wrap_ddp(m[k], device) for k in m})
        grads = run_steps(net, m, opt_G, opt_D, pool, cfg, batches, slice(2 * rank, 2 * rank + 2))
        dist.destroy()
        torch.save(grads, probe / f"rank{rank}.pt")
        return 0
    if mode == "cyclegan":
        from melano import cyclegan as cg, gan
        held, build = {}, gan.build_models
        gan.build_models = lambda cfg: held.setdefault("m", build(cfg))
        rc = cg.main(["train", *args])
        torch.save({"models": held["m"].state_dict()}, probe / f"rank{rank}.pt")
        return rc
    if mode == "classifier":
        from melano import classifier
        from melano.classifier import trainer
        held, build, infer = {"val": []}, trainer.build_model, trainer.infer

        def recording_infer(model, norm, loader, *a, **k):  # this rank's share: (indices, logits, targets)
            logits, y = infer(model, norm, loader, *a, **k)
            if isinstance(loader.sampler, list):  # validation (evaluate's test loader has no list)
                held["val"].append((np.asarray(loader.sampler), logits, y))
            return logits, y

        trainer.build_model = lambda cfg: held.setdefault("m", build(cfg))
        trainer.infer = recording_infer
        rc = classifier.main(["train", *args])
        torch.save({"model": held["m"].state_dict(),
                    "val": [tuple(torch.from_numpy(a) for a in v) for v in held["val"]]}, probe / f"rank{rank}.pt")
        return rc
    raise SystemExit(f"unknown worker mode {mode!r}")


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2:]))
