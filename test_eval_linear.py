"""Tests of eval_linear.py and run_imagenet.sh (spec §7-§9), small enough for 2 CPU cores:

    python -m pytest -q test_eval_linear.py
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_linear
from intl import MEAN, STD, resnet_backbone

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"n00000001": (200, 40, 40), "n00000002": (40, 200, 40), "n00000003": (40, 40, 200)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet layout, 32-px PNGs: three classes of noisy solid colours, which the random
    crops of the linear protocol leave as they are; 8 train / 4 val images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in [("train", 8), ("val", 4)]:
        for cls, colour in COLOURS.items():
            os.makedirs(root / split / cls)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 10, (32, 32, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(root / split / cls / f"{cls}_{i}.png")
    return root


def images(folder, split="train"):
    """The folder's images as one normalised batch."""
    paths = sorted(p for p in (folder / split).rglob("*.png"))
    x = torch.tensor(np.stack([np.asarray(Image.open(p)) for p in paths]), dtype=torch.float32)
    x = x.permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def backbone(folder, seed=0):
    """A ResNet-18 (32-px stem) whose BN statistics come from the images, like a trained one:
    at random init (running var 1) the features are far too large for a linear probe."""
    torch.manual_seed(seed)
    net = resnet_backbone("resnet18", small_images=True)[0]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # cumulative average
    with torch.no_grad():
        net.train()(images(folder))
    return net.eval()


@pytest.fixture(scope="module")
def backbone_pth(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "backbone.pth"
    torch.save(backbone(folder).state_dict(), path)
    return path


def run(args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "eval_linear.py")] + args,
                          capture_output=True, text=True, cwd=cwd)


def common(folder, out, *extra):
    return ["--data", str(folder), "--arch", "resnet18", "--small-images", "--batch-size", "8",
            "--workers", "0", "--print-freq", "100", "--output-dir", str(out), *extra]


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- linear protocol
def test_linear_end_to_end_and_resume(folder, backbone_pth, tmp_path):
    # 2 epochs: the step schedule would decay the lr after the first one
    linear = ["--pretrained", str(backbone_pth), "--epochs", "2", "--schedule", "cos"]
    straight = tmp_path / "straight"
    best = eval_linear.main(common(folder, straight, *linear))
    assert best["acc1"] >= 90, best   # chance is 33 %
    rec = log(straight)
    assert [r["epoch"] for r in rec] == [1, 2] and all("acc5" in r for r in rec)
    assert os.path.exists(straight / "best.pth")

    resumed = tmp_path / "resumed"
    eval_linear.main(common(folder, resumed, *linear, "--stop-epoch", "1"))
    assert torch.load(resumed / "checkpoint.pth")["epoch"] == 1
    eval_linear.main(common(folder, resumed, *linear))
    a, b = torch.load(straight / "checkpoint.pth"), torch.load(resumed / "checkpoint.pth")
    assert b["epoch"] == 2
    for key in ["fc.weight", "fc.bias"]:
        assert torch.equal(a["model"][key], b["model"][key])


def test_finetune_on_a_subset_list(folder, backbone_pth, tmp_path):
    listed = [f"{cls}_{i}.png" for cls in COLOURS for i in range(2)]
    (tmp_path / "subset.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "semi"
    eval_linear.main(common(folder, out, "--pretrained", str(backbone_pth), "--weights", "finetune",
                            "--train-subset", str(tmp_path / "subset.txt"), "--epochs", "1"))
    state = torch.load(out / "checkpoint.pth")["model"]
    before = torch.load(backbone_pth)
    assert not torch.equal(state["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])


def test_lr_schedules():
    assert [eval_linear.lr_factor(e, 100, "step") for e in (0, 59, 60, 79, 80, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert eval_linear.lr_factor(0, 20, "cos") == 1 and eval_linear.lr_factor(10, 20, "cos") == pytest.approx(0.5)


# ----------------------------------------------------------------------------- k-NN
def brute_force_knn(bank, labels, queries, k, temperature):
    """One query at a time, a full sort, votes counted in a Python dict."""
    preds = []
    for q in queries:
        sims = [float(q @ b) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = {}
        for i in order:
            w = 1.0 if temperature is None else np.exp(sims[i] / temperature)
            votes[int(labels[i])] = votes.get(int(labels[i]), 0.0) + w
        preds.append(min(votes, key=lambda c: (-votes[c], c)))   # ties: smallest class
    return torch.tensor(preds)


@pytest.mark.parametrize("k, temperature", [(5, None), (20, 0.07)])
def test_knn_matches_brute_force(k, temperature):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    queries = F.normalize(torch.randn(53, 16, generator=g, dtype=torch.float64), dim=1)
    expected = brute_force_knn(bank, labels, queries, k, temperature)
    for chunk in (1, 10, 1024):
        assert torch.equal(eval_linear.knn_predict(bank, labels, queries, k, temperature, chunk), expected)


def test_knn_end_to_end(folder, backbone_pth, tmp_path):
    out = tmp_path / "knn"
    result = eval_linear.main(common(folder, out, "--pretrained", str(backbone_pth), "--knn", "--knn-chunk", "5"))
    net = backbone(folder)
    with torch.no_grad():
        bank, queries = F.normalize(net(images(folder)), dim=1), F.normalize(net(images(folder, "val")), dim=1)
    labels = torch.arange(3).repeat_interleave(8)
    truth = torch.arange(3).repeat_interleave(4)
    for key, k, t in [("knn5_top1", 5, None), ("knn20_top1", 20, 0.07)]:
        acc = 100 * (brute_force_knn(bank, labels, queries, k, t) == truth).double().mean().item()
        assert result[key] == pytest.approx(acc, abs=1e-9)
    assert log(out) == [result]


# ----------------------------------------------------------------------------- §9 checkpoint layouts
def args_for(path, arch="resnet18", momentum_encoder=False):
    return argparse.Namespace(pretrained=str(path), arch=arch, small_images=True, momentum_encoder=momentum_encoder)


def loaded_features(path, x, momentum_encoder=False):
    net = resnet_backbone("resnet18", small_images=True)[0]
    eval_linear.load_pretrained(net, args_for(path, momentum_encoder=momentum_encoder))
    with torch.no_grad():
        return net.eval()(x)


def test_four_layouts_give_identical_features(folder, tmp_path):
    online_net, target_net = backbone(folder, seed=0), backbone(folder, seed=1)
    online, target = online_net.state_dict(), target_net.state_dict()
    projector = {"0.weight": torch.randn(8, 512), "1.weight": torch.ones(8), "3.bias": torch.zeros(8)}
    prefixed = lambda state, p: {p + k: v for k, v in state.items()}
    files = {
        "ours-checkpoint": {"model": {**prefixed(online, "backbone."), **prefixed(projector, "projector.")},
                            "target": {**prefixed(target, "backbone."), **prefixed(projector, "projector.")},
                            "optimizer": {}, "scaler": {}, "epoch": 1, "step": 1,
                            "args": {"arch": "resnet18", "small_images": True, "method": "intl-m"}, "rng": []},
        "ours-backbone": online,
        "authors": {"epoch": 1, "arch": "resnet18", "optimizer": {},
                    "state_dict": {**prefixed(online, "module.backbone."),
                                   **prefixed(projector, "module.projection."),
                                   **prefixed(target, "module.momentum_backbone."),
                                   **prefixed(projector, "module.momentum_projection.")}},
        "torchvision": {**online, "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)},
    }
    x = images(folder, "val")[::3]
    with torch.no_grad():
        want, want_target = online_net(x), target_net(x)
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        assert torch.equal(loaded_features(tmp_path / f"{name}.pth", x), want), name
    for name in ["ours-checkpoint", "authors"]:
        assert torch.equal(loaded_features(tmp_path / f"{name}.pth", x, momentum_encoder=True), want_target)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_bad_checkpoints_are_one_line_errors(folder, backbone_pth, tmp_path):
    torch.save({"encoder.conv1.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    assert_one_line_error(run(common(folder, tmp_path / "o", "--pretrained", str(tmp_path / "odd.pth"))),
                          "unrecognised layout", "encoder", "head")
    assert_one_line_error(run(common(folder, tmp_path / "o", "--pretrained", str(tmp_path / "nope.pth"))),
                          "nope.pth", "no such file")
    wrong_arch = common(folder, tmp_path / "o", "--pretrained", str(backbone_pth))
    wrong_arch[wrong_arch.index("resnet18")] = "resnet34"
    assert_one_line_error(run(wrong_arch), "does not fit --arch resnet34")


# ----------------------------------------------------------------------------- subset lists
def test_subset_list_parsing(folder, tmp_path):
    root = str(folder / "train")
    classes = {c: i for i, c in enumerate(sorted(COLOURS))}
    (tmp_path / "ok.txt").write_text("n00000002_3.png\n\nn00000001_0.png  \n")
    assert eval_linear.subset_samples(str(tmp_path / "ok.txt"), root, classes) == [
        (os.path.join(root, "n00000002", "n00000002_3.png"), 1),
        (os.path.join(root, "n00000001", "n00000001_0.png"), 0)]
    (tmp_path / "missing.txt").write_text("n00000001_0.png\nn00000003_99.png\n")
    with pytest.raises(SystemExit) as e:
        eval_linear.subset_samples(str(tmp_path / "missing.txt"), root, classes)
    assert "n00000003_99.png" in str(e.value.code)
    proc = run(common(folder, tmp_path / "o", "--weights", "finetune", "--train-subset",
                      str(tmp_path / "missing.txt")))
    assert_one_line_error(proc, "n00000003_99.png")


# ----------------------------------------------------------------------------- run_imagenet.sh
# spec §7, written out again here: epochs, base lr, method, multi-crop, linear-eval lr; §8
# backbone lr for the semi-supervised fine-tuning
SPEC_7 = {"100": (100, 0.5, "intl-m", True, 0.4, 0.004),
          "200": (200, 0.4, "intl-m", True, 0.4, 0.004),
          "400": (400, 0.4, "intl-m", True, 0.4, 0.004),
          "800": (800, 0.3, "intl-m", True, 0.4, 0.004),
          "800-2view": (800, 0.3, "intl", False, 0.2, 0.006)}


def dry_run(tmp_path, **env):
    env = {**os.environ, "DRY_RUN": "1", "DATA": "/data/imagenet", "OUT": str(tmp_path / "out"), **env}
    proc = subprocess.run(["bash", os.path.join(HERE, "run_imagenet.sh")], env=env,
                          capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_run_imagenet_syntax():
    assert subprocess.run(["bash", "-n", os.path.join(HERE, "run_imagenet.sh")]).returncode == 0


@pytest.mark.parametrize("schedule", sorted(SPEC_7))
def test_run_imagenet_hyper_parameters(schedule, tmp_path):
    epochs, lr, method, multi_crop, linear_lr, backbone_lr = SPEC_7[schedule]
    cmds = dry_run(tmp_path, SCHEDULE=schedule, SUBSET_1="/lists/1percent.txt",
                   SUBSET_10="/lists/10percent.txt", NPROC="8", NNODES="4", NODE_RANK="2",
                   MASTER_ADDR="10.1.2.3", MASTER_PORT="1234")
    assert [c[0] for c in cmds] == ["torchrun"] * 4
    for c in cmds:
        assert {"--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--master_addr=10.1.2.3",
                "--master_port=1234"} <= set(c)
    pretrain, linear, semi1, semi10 = cmds
    assert "intl.py" in pretrain and flag(pretrain, "--data") == "/data/imagenet"
    assert int(flag(pretrain, "--epochs")) == epochs and float(flag(pretrain, "--lr")) == lr
    assert flag(pretrain, "--method") == method and ("--multi-crop" in pretrain) == multi_crop
    assert "eval_linear.py" in linear and float(flag(linear, "--lr")) == linear_lr
    assert flag(linear, "--pretrained") == flag(pretrain, "--output-dir") + "/backbone.pth"
    for c, subset in [(semi1, "/lists/1percent.txt"), (semi10, "/lists/10percent.txt")]:
        assert flag(c, "--weights") == "finetune" and flag(c, "--train-subset") == subset
        assert int(flag(c, "--epochs")) == 20 and float(flag(c, "--lr-classifier")) == 0.2
        assert float(flag(c, "--lr-backbone")) == backbone_lr


def test_run_imagenet_skips_finished_stages(tmp_path):
    cmds = dry_run(tmp_path, SCHEDULE="100", NPROC="1")
    assert len(cmds) == 2   # no subset lists: no semi-supervised stage
    os.makedirs(tmp_path / "out" / "pretrain")
    (tmp_path / "out" / "pretrain" / "done").touch()
    assert dry_run(tmp_path, SCHEDULE="100", NPROC="1") == cmds[1:]
