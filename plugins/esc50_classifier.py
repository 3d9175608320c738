"""esc50-classifier: an offline evaluation feature model trained here on real ESC-50 audio only.

A small CNN on a 64-bin log-mel (16 kHz, 1024-point Hann STFT magnitude, hop 160, Slaney mel
0-8000 Hz, ``log(max(x, 1e-5))``: the reference front end of section 1, computed with torchaudio
and pinned here so that the shipped weights never change meaning). Five conv blocks (3x3 conv, BN,
ReLU, 2x2 average pool; 16..256 channels), mean over frequency, max + mean over time, then
``Linear(256, 128) + ReLU`` = the embedding and ``Linear(128, 50)`` = the logits over the 50 ESC-50
classes (``labels``, in ESC-50 target order).

* ``logits``: one forward pass over the whole clip (any length; < 1 s is zero-padded to 1 s).
* ``embed_frames``: the 128-d embedding of each 0.96 s stretch of the clip (3 time steps of the
  final feature map, non-overlapping): the frames FAD pools, like VGGish's 0.96 s examples.

Weights: ``plugins/weights/esc50-classifier/`` (``model.safetensors`` + ``config.json``; model card
in its README.md). Train (a few minutes on 2 cores)::

    python -m reaudio_plugins.esc50_classifier train --data ../shared/data/esc50-fold4 \\
        --out plugins/weights/esc50-classifier
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reaudio_core import hookimpl
from reaudio_core.interfaces import FeatureModel
from reaudio_core.io import atomic_write, atomic_write_text
from reaudio_core.registry import ReaudioError

from ._features import pad_to, sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "esc50-classifier"
VERSION = "esc50-classifier-v1"


class LogMel(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, f_max: float):
        super().__init__()
        import torchaudio
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop, f_min=0.0,
                                                        f_max=f_max, n_mels=n_mels, power=1.0, norm="slaney",
                                                        mel_scale="slaney")

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, 1, T, n_mels]`` natural-log mel magnitude."""
        return torch.log(self.mel(wav).clamp(min=1e-5)).transpose(1, 2)[:, None]


class Esc50Net(nn.Module):
    def __init__(self, *, channels: Sequence[int], emb_dim: int, num_classes: int, n_mels: int, dropout: float):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(n_mels)
        layers, c = [], 1
        for co in channels:
            layers += [nn.Conv2d(c, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(), nn.AvgPool2d(2)]
            c = co
        self.trunk = nn.Sequential(*layers)
        self.emb = nn.Linear(c, emb_dim)
        self.out = nn.Linear(emb_dim, num_classes)
        self.dropout = dropout

    def feature_map(self, logmel: torch.Tensor) -> torch.Tensor:
        """``[B, 1, T, F]`` -> ``[B, C, T']`` (frequency averaged)."""
        x = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)
        return self.trunk(x).mean(dim=3)

    def head(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, T']`` -> ``(embedding [B, emb_dim], logits [B, classes])``."""
        pooled = fmap.max(dim=2).values + fmap.mean(dim=2)
        emb = F.relu(self.emb(F.dropout(pooled, self.dropout, self.training)))
        return emb, self.out(F.dropout(emb, self.dropout, self.training))

    def forward(self, logmel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.feature_map(logmel))


DEFAULT_CONFIG = {
    "sample_rate": 16000, "n_fft": 1024, "hop": 160, "n_mels": 64, "f_max": 8000.0,
    "channels": [16, 32, 64, 128, 256], "emb_dim": 128, "dropout": 0.2,
    "frame_steps": 3,  # final-map time steps per FAD frame: 3 * 32 hops * 10 ms = 0.96 s
    "min_seconds": 1.0,
}


def build(config: dict) -> tuple[LogMel, Esc50Net]:
    front = LogMel(config["sample_rate"], config["n_fft"], config["hop"], config["n_mels"], config["f_max"])
    net = Esc50Net(channels=config["channels"], emb_dim=config["emb_dim"], num_classes=len(config["labels"]),
                   n_mels=config["n_mels"], dropout=config["dropout"])
    return front, net


class Esc50Classifier(FeatureModel):
    name = "esc50-classifier"

    def __init__(self, *, weights, device, batch_size):
        directory = Path(weights).expanduser() if weights else WEIGHTS_DIR
        cfg_path, st_path = directory / "config.json", directory / "model.safetensors"
        if not (cfg_path.exists() and st_path.exists()):
            raise ReaudioError(f"esc50-classifier weights not found in {directory} (need config.json and "
                               "model.safetensors); train them with: python -m reaudio_plugins.esc50_classifier "
                               "train --data ../shared/data/esc50-fold4 --out plugins/weights/esc50-classifier")
        from safetensors.torch import load_file
        self.config = json.loads(cfg_path.read_text())
        self.labels: list[str] = list(self.config["labels"])
        self.front, self.net = build(self.config)
        self.net.load_state_dict(load_file(str(st_path)))
        self.front.to(device).eval()
        self.net.to(device).eval().requires_grad_(False)
        self.sample_rate = int(self.config["sample_rate"])
        self.num_classes = len(self.labels)
        self.dim = int(self.config["emb_dim"])
        self.device, self.batch_size = device, batch_size
        self.weights = str(directory)
        self.fingerprint = f"{VERSION}:{sha256_file(st_path)[:32]}:{sha256_file(cfg_path)[:16]}"

    @torch.inference_mode()
    def _run(self, wavs: Sequence[np.ndarray], frames: bool):
        from ._features import by_length
        n_min = int(self.config["min_seconds"] * self.sample_rate)
        wavs = [pad_to(w, n_min) for w in wavs]
        out_frames: list = [None] * len(wavs)
        logits = torch.zeros(len(wavs), self.num_classes)
        step = int(self.config["frame_steps"])
        for idx, batch in by_length(wavs, self.batch_size):
            fmap = self.net.feature_map(self.front(batch.to(self.device)))  # [B, C, T']
            _, lg = self.net.head(fmap)
            logits[idx] = lg.float().cpu()
            if frames:
                n = max(1, fmap.shape[2] // step)
                windows = fmap[:, :, :n * step] if fmap.shape[2] >= step else fmap
                windows = windows.reshape(fmap.shape[0], fmap.shape[1], n, -1).permute(0, 2, 1, 3)  # [B, n, C, s]
                emb, _ = self.net.head(windows.reshape(-1, fmap.shape[1], windows.shape[-1]))
                emb = emb.reshape(fmap.shape[0], n, -1).float().cpu().numpy()
                for j, i in enumerate(idx):
                    out_frames[i] = emb[j]
        return out_frames, logits

    def embed_frames(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._run(wavs, True)[0]

    def logits(self, wavs: Sequence[np.ndarray]) -> torch.Tensor:
        return self._run(wavs, False)[1]

    def embed_and_logits(self, wavs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], torch.Tensor]:
        """Both from one forward pass (used by :mod:`reaudio_core.evaluation` when present)."""
        return self._run(wavs, True)

    def classify(self, wavs: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """``(label, probability)`` of the top class for each clip."""
        p = self.logits(wavs).softmax(-1)
        conf, top = p.max(-1)
        return [(self.labels[int(t)], float(c)) for t, c in zip(top, conf)]


@hookimpl
def register_components(register):
    register("feature_model", "esc50-classifier", Esc50Classifier, tiny={})  # the shipped model is small


# -- training ------------------------------------------------------------------------------
def read_esc50(data: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str], list[str]]:
    """All clips of an ESC-50 folder (metadata.csv: file, category, target) at 16 kHz, same length."""
    from reaudio_core.audio import load_audio
    meta = data / "metadata.csv"
    if not meta.exists():
        raise ReaudioError(f"{meta} not found: --data must be an ESC-50 folder with metadata.csv")
    rows = list(csv.DictReader(meta.open(encoding="utf-8")))
    n_classes = max(int(r["target"]) for r in rows) + 1
    labels = [""] * n_classes
    for r in rows:
        labels[int(r["target"])] = r["category"]
    wavs = [load_audio(data / r["file"]) for r in rows]
    length = max(len(w) for w in wavs)
    x = np.stack([pad_to(w, length) for w in wavs])
    y = np.array([int(r["target"]) for r in rows])
    sources = [Path(r["file"]).stem.split("-")[1] for r in rows]  # ESC-50 name: fold-source-take-target
    return x, y, labels, sources, [r["file"] for r in rows]


def folds_by_source(y: np.ndarray, sources: list[str], n_folds: int) -> np.ndarray:
    """Fold id per clip, equal fold sizes per class. Takes of one source recording are kept in one
    fold wherever the class allows it (first-fit decreasing), so a split does not leak a recording."""
    fold = np.zeros(len(y), dtype=int)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        room = [math.ceil(len(idx) / n_folds)] * n_folds
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(sources[i], []).append(int(i))
        for _, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            fits = [f for f in range(n_folds) if room[f] >= len(members)]
            for i in members:
                f = fits[0] if fits else max(range(n_folds), key=lambda k: room[k])
                fold[i] = f
                room[f] -= 1
    return fold


def augment(x: torch.Tensor, crop: int, gen: torch.Generator, sr: int) -> torch.Tensor:
    """Random time shift (+-0.5 s, zero fill), random crop of ``crop`` samples, random gain (-12..+6 dB)."""
    b, n = x.shape
    out = torch.zeros(b, crop)
    for i in range(b):
        shift = int(torch.randint(-sr // 2, sr // 2 + 1, (1,), generator=gen))
        w = torch.roll(x[i], shift)
        if shift > 0:
            w[:shift] = 0
        elif shift < 0:
            w[shift:] = 0
        start = int(torch.randint(0, max(1, n - crop + 1), (1,), generator=gen))
        seg = w[start:start + crop]
        gain = 10 ** (float(torch.empty(1).uniform_(-12, 6, generator=gen)) / 20)
        out[i, :len(seg)] = seg * gain
    return out


def spec_augment(mel: torch.Tensor, gen: torch.Generator, masks: int = 2, max_bins: int = 8,
                 max_frames: int = 40) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) on ``[B, 1, T, F]`` log-mels: ``masks`` frequency bands of up to
    ``max_bins`` bins and ``masks`` time stretches of up to ``max_frames`` frames per clip, each set to
    that clip's mean."""
    out = mel.clone()
    for clip in out:  # [1, T, F] views into out
        fill = clip.mean()
        for size, axis in ((max_bins, -1), (max_frames, -2)):
            for _ in range(masks):
                w = int(torch.randint(0, size + 1, (1,), generator=gen))
                a = int(torch.randint(0, max(1, clip.shape[axis] - w + 1), (1,), generator=gen))
                clip.narrow(axis, a, w).fill_(fill)
    return out


def train_model(x: np.ndarray, y: np.ndarray, labels: list[str], config: dict, *, epochs: int, seed: int,
                batch_size: int = 32, lr: float = 3e-3, crop_seconds: float = 3.0,
                val: tuple[np.ndarray, np.ndarray] | None = None, log=print, specaugment: bool = False,
                mixup: float = 0.0) -> tuple[Esc50Net, dict]:
    """``specaugment``: :func:`spec_augment` on every training batch; ``mixup`` > 0: mixup (Zhang et al.
    2018) of log-mels and label distributions with a Beta(mixup, mixup) weight per batch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = {**config, "labels": labels}
    front, net = build(cfg)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    crop = int(crop_seconds * cfg["sample_rate"])
    history = {}
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            with torch.no_grad():
                mel = front(augment(xt[idx], crop, gen, cfg["sample_rate"]))
                if specaugment:
                    mel = spec_augment(mel, gen)
            target = F.one_hot(yt[idx], len(labels)).float()
            if mixup > 0:
                lam = float(torch.distributions.Beta(mixup, mixup).sample())
                perm2 = torch.randperm(len(idx), generator=gen)
                mel = lam * mel + (1 - lam) * mel[perm2]
                target = lam * target + (1 - lam) * target[perm2]
            _, logits = net(mel)
            loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(-1) == yt[idx]).sum())
            loss_sum += loss.item() * len(idx)
        msg = f"epoch {epoch + 1:>3}/{epochs}  loss {loss_sum / total:.3f}  train acc {correct / total:.3f}"
        if val is not None and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            history["val_accuracy"] = accuracy(front, net, *val)
            msg += f"  val acc {history['val_accuracy']:.3f}"
        log(msg)
    net.eval()
    return net, history


@torch.inference_mode()
def accuracy(front: LogMel, net: Esc50Net, x: np.ndarray, y: np.ndarray) -> float:
    net.eval()
    preds = torch.cat([net(front(torch.from_numpy(x[i:i + 64])))[1].argmax(-1) for i in range(0, len(x), 64)])
    return float((preds.numpy() == y).mean())


def save_weights(net: Esc50Net, config: dict, out: Path) -> None:
    """Atomic per file (:func:`reaudio_core.io.atomic_write`): each of the two files is the old or the new one."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    for name in ("model.safetensors", "config.json"):
        os.chmod(out / name, 0o644)


def cmd_train(args) -> int:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    t0 = time.time()
    x, y, labels, sources, _ = read_esc50(Path(args.data))
    print(f"{len(x)} clips, {len(labels)} classes, {x.shape[1] / 16000:.2f} s each ({time.time() - t0:.1f} s to load)")
    config = {**DEFAULT_CONFIG, "labels": labels}
    fold = folds_by_source(y, sources, args.folds_of)
    accs = []
    for f in range(args.folds):
        tr, va = fold != f, fold == f
        leak = len({sources[i] for i in np.flatnonzero(tr)} & {sources[i] for i in np.flatnonzero(va)})
        print(f"-- held-out fold {f + 1}/{args.folds_of}: train {tr.sum()}, validate {va.sum()} "
              f"({leak} source recordings on both sides)")
        net, hist = train_model(x[tr], y[tr], labels, config, epochs=args.epochs, seed=args.seed + f,
                                val=(x[va], y[va]), specaugment=args.specaugment, mixup=args.mixup)
        accs.append(hist["val_accuracy"])
    print(f"-- final model on all {len(x)} clips")
    net, _ = train_model(x, y, labels, config, epochs=args.epochs, seed=args.seed, specaugment=args.specaugment,
                         mixup=args.mixup)
    front, _ = build(config)
    train_acc = accuracy(front, net, x, y)
    elapsed = time.time() - t0
    config["training"] = {
        "data": "ESC-50 fold 4 (400 clips, 50 classes x 8, 5 s, 16 kHz)", "epochs": args.epochs, "seed": args.seed,
        "augmentation": "time shift +-0.5 s, random 3 s crop, gain -12..+6 dB; label smoothing 0.1"
                        + ("; SpecAugment 2 x 8 bins, 2 x 40 frames" if args.specaugment else "")
                        + (f"; mixup alpha {args.mixup:g}" if args.mixup else ""),
        "held_out_folds": args.folds, "folds_of": args.folds_of,
        "held_out_accuracy": [round(a, 4) for a in accs],
        "held_out_accuracy_mean": round(float(np.mean(accs)), 4) if accs else None,
        "train_accuracy_final": round(train_acc, 4), "seconds": round(elapsed, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    save_weights(net, config, Path(args.out))
    if accs:
        print(f"held-out accuracy (train {args.folds_of - 1}/{args.folds_of}, validate 1/{args.folds_of} "
              f"per class): {', '.join(f'{a:.3f}' for a in accs)}; mean {np.mean(accs):.3f} (chance 0.020)")
    print(f"final model: training-set accuracy {train_acc:.3f}; wrote {args.out} in {elapsed:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reaudio_plugins.esc50_classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on an ESC-50 folder; write model.safetensors + config.json")
    t.add_argument("--data", required=True, metavar="DIR", help="ESC-50 folder with metadata.csv and audio/")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--folds-of", type=int, default=4, help="split each class into this many parts (8 clips: 4 -> 6/2)")
    t.add_argument("--folds", type=int, default=1, help="how many of those parts to hold out in turn (0: none)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--specaugment", action="store_true", help="SpecAugment masks on every training batch")
    t.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA); 0: off")
    t.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ReaudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
