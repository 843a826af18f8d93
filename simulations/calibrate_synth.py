"""Is the synthetic classroom hard enough, and learnable enough? Train one centralised, non-private model
on the union of the schools' still frames and report accuracy on the public split.

    python -m simulations.calibrate_synth [--model gncnn|resnet18|hafnet] [--epochs 12] [--threads 2]
                                          [--root DIR] [key=value config overrides ...]

Target (issue #2): 65-92% on the public FER2013-format split for a converged model (aim ~75-85%), and
a signal that survives 48x48 grayscale. `gncnn` is a small GroupNorm CNN (fast proxy); `resnet18` is
torchvision's, random init, BatchNorm; `hafnet` is the registry's cpu preset. Augmentation is a
horizontal flip, a small shift and 10% grayscale (batched, for speed). No pretrained weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF
from PIL import Image
from torch import nn

from shared_models.config import load_config
from shared_models.labels import FER7
from simulations import synth


def gn_cnn(num_classes: int = 7) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, num_classes))


def build_model(name: str, size: int) -> nn.Module:
    if name == "gncnn":
        return gn_cnn()
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=7)          # random init: never a download
        model.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)   # 64 px input: 3x3/2 stem instead of 7x7/2 + max-pool
        model.maxpool = nn.Identity()
        return model
    if name == "hafnet":
        from shared_models.models import registry

        net = registry.build("hafnet", num_classes=7, preset="cpu")

        class Logits(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.net(x)
                return out.logits if hasattr(out, "logits") else out

        return Logits()
    raise ValueError(f"unknown model '{name}' (gncnn, resnet18, hafnet)")


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W[, 3]) -> float (N, 3, size, size) in [-1, 1] (as shared_models.transforms)."""
    x = torch.from_numpy(images)
    x = x[..., None].expand(*x.shape, 3) if x.ndim == 3 else x
    x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != size:
        x = TF.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


def load_schools(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, schools = [], [], []
    for school in sorted((root / "schools").iterdir()):
        with open(school / "labels.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                images.append(np.asarray(Image.open(school / row["path"]).convert("RGB")))
                labels.append(FER7.index(row["label"]))
                schools.append(school.name)
    return np.stack(images), np.asarray(labels), schools


def load_fer2013(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, usage = [], [], []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            images.append(np.asarray(row["pixels"].split(" "), np.uint8).reshape(48, 48))
            labels.append(int(row["emotion"]))
            usage.append(row["Usage"])
    return np.stack(images), np.asarray(labels), usage


def load_rafdb(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    code_to_label = {code: FER7.index(name) for name, code in synth.RAFDB_CODES.items()}
    for line in (root / "EmoLabel" / "list_patition_label.txt").read_text().split("\n"):
        if line.strip():
            name, code = line.split()
            images.append(np.asarray(Image.open(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"))))
            labels.append(code_to_label[int(code)])
    return np.stack(images), np.asarray(labels)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gray = torch.rand(n, generator=gen) < 0.1
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].expand_as(x)
    return torch.where(gray[:, None, None, None], lum, x)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gncnn", choices=("gncnn", "resnet18", "hafnet"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=64, help="model input side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="", help="dataset root (default: data.root or the cache)")
    parser.add_argument("--json", default="", help="also write the result here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.seed=7")
    return parser


@dataclass
class _Data:
    """The schools' stills (training) and both public splits (evaluation) as model-input tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_fer: torch.Tensor
    fer_y: np.ndarray
    fer_usage: list[str]
    x_raf: torch.Tensor
    raf_y: np.ndarray


def _load_data(root: Path, params: synth.SynthParams, size: int) -> _Data:
    """Build the dataset if needed, read it with the same layouts the clients and evaluator read."""
    t0 = time.perf_counter()
    synth.ensure_dataset(root, params, progress=lambda d, t, w: print(f"\r  generating {d}/{t} {w}   ", end="", flush=True))
    print(f"\ndataset {root} ready in {time.perf_counter() - t0:.1f} s")
    train_u8, train_y, _ = load_schools(root)
    fer_u8, fer_y, fer_usage = load_fer2013(root / "public" / "fer2013.csv")
    raf_u8, raf_y = load_rafdb(root / "public" / "rafdb")
    data = _Data(_to_tensor(train_u8, size), torch.from_numpy(train_y), _to_tensor(fer_u8, size), fer_y, fer_usage,
                 _to_tensor(raf_u8, size), raf_y)
    print(f"train {len(data.y_train)} frames from {params.schools} schools; public {len(fer_y)} (FER2013 48px gray), "
          f"{len(raf_y)} (RAF-DB 100px colour)")
    return data


def _train(model: nn.Module, data: _Data, args: argparse.Namespace) -> list[dict[str, float]]:
    """Adam with a one-cycle schedule; after every epoch both public accuracies (printed and returned)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(data.y_train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    print(f"{'epoch':>5} {'loss':>7} {'train':>6} {'fer2013':>8} {'rafdb':>6} {'s':>6}")
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(data.y_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            xb, yb = augment(data.x_train[idx], gen), data.y_train[idx]
            logits = model(xb)
            loss = TF.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        fer_acc = float((predict(model, data.x_fer) == data.fer_y).mean())
        raf_acc = float((predict(model, data.x_raf) == data.raf_y).mean())
        history.append({"epoch": epoch, "loss": loss_sum / total, "train_acc": correct / total, "fer2013_acc": fer_acc,
                        "rafdb_acc": raf_acc})
        print(f"{epoch:>5} {loss_sum / total:>7.3f} {correct / total:>6.3f} {fer_acc:>8.3f} {raf_acc:>6.3f} "
              f"{time.perf_counter() - started:>6.1f}", flush=True)
    return history


def _report(model: nn.Module, data: _Data, history: list[dict[str, float]], args: argparse.Namespace,
            params: synth.SynthParams, root: Path, argv: list[str] | None) -> dict:
    """Final accuracies (FER2013 split by usage, RAF-DB), per-class recall and confusion: printed and returned."""
    fer_y = data.fer_y
    pred = predict(model, data.x_fer)
    usage = np.asarray(data.fer_usage)
    recall = {FER7[c]: float((pred[fer_y == c] == c).mean()) for c in range(7) if (fer_y == c).any()}
    confusion = np.zeros((7, 7), int)
    np.add.at(confusion, (fer_y, pred), 1)
    result = {
        "model": args.model, "epochs": args.epochs, "params": params.__dict__, "root": str(root),
        "fer2013_acc": float((pred == fer_y).mean()),
        "fer2013_public_acc": float((pred[usage == "PublicTest"] == fer_y[usage == "PublicTest"]).mean()),
        "fer2013_private_acc": float((pred[usage == "PrivateTest"] == fer_y[usage == "PrivateTest"]).mean()),
        "rafdb_acc": history[-1]["rafdb_acc"], "train_acc": history[-1]["train_acc"], "recall": recall,
        "confusion_rows_true_cols_pred": confusion.tolist(), "history": history,
        "command": "python -m simulations.calibrate_synth " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    print("per-class recall (FER2013 split): " + ", ".join(f"{k} {v:.2f}" for k, v in recall.items()))
    print("confusion (rows true, cols predicted; " + " ".join(c[:3] for c in FER7) + ")")
    for c in range(7):
        print(f"  {FER7[c][:3]} " + " ".join(f"{v:>4}" for v in confusion[c]))
    print(f"PUBLIC ACCURACY (FER2013 format, {len(fer_y)} faces): {result['fer2013_acc']:.3f}  "
          f"(PublicTest {result['fer2013_public_acc']:.3f}, PrivateTest {result['fer2013_private_acc']:.3f}; "
          f"RAF-DB format {result['rafdb_acc']:.3f})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, args.overrides)
    params = synth.params_from_config(cfg)
    root = Path(args.root).expanduser() if args.root else synth.root_from_config(cfg)
    data = _load_data(root, params, args.size)
    model = build_model(args.model, args.size)
    history = _train(model, data, args)
    result = _report(model, data, history, args, params, root, argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
