"""``d2sm demo``: train a small denoiser with L1 and with L1 + weight·D2SM on real images that ship
with scikit-image, and show what changed.

Setup (everything offline, CPU-sized by default):

* Data: scikit-image's colour images. Train: astronaut, retina, hubble_deep_field,
  immunohistochemistry, colorwheel. Test: chelsea, coffee, rocket, stereo_motorcycle (left view).
  Training draws random ``crop``×``crop`` crops with random flips and adds colour Gaussian noise
  with σ ~ U[0, 50] (/255; the paper uses [0, 75]); testing uses σ ∈ {15, 25, 50} with a fixed
  noise seed.
* Model: a small FFDNet/DnCNN-style residual CNN that also sees the noise level map.
* Runs: identical seeds and data order; "L1" and "L1+D2SM" (D2SMLoss, EfficientNet-Lite0,
  internal patch sampling by default — ``--sampling pooled|batch --queue-size Q`` trains with a
  feature queue instead; patch size and stride scaled from the paper's 224/56 to the crop:
  patch = crop/2, stride = crop/4, i.e. 3×3 patches per crop).
* Metrics on the test images: PSNR and SSIM (scikit-image), and semantic agreement — the share
  of 224×224 tiles of the test images whose top-1 ImageNet class on the denoised tile equals the
  class on the clean tile, judged by EfficientNet-Lite2 (a different network from the loss's).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

TRAIN_IMAGES = ("astronaut", "retina", "hubble_deep_field", "immunohistochemistry", "colorwheel")
TEST_IMAGES = ("chelsea", "coffee", "rocket", "stereo_motorcycle")
TEST_SIGMAS = (15, 25, 50)
TRAIN_SIGMA_MAX = 50


@dataclass
class DemoConfig:
    steps: int = 1000
    batch: int = 4
    crop: int = 96
    lr: float = 1e-3
    sigma: float | None = None  # fixed training σ (/255); None draws σ ~ U[0, 50] per crop
    weight: float = 1.0
    device: str = "cpu"
    seed: int = 0
    out: str = "demo_out"
    width: int = 32
    depth: int = 5
    max_test_images: int = len(TEST_IMAGES)  # fewer for quick smoke runs
    sampling: str = "internal"  # D2SMLoss sampling: "internal", "pooled" or "batch"
    queue_size: int = 0  # a feature queue for "pooled"/"batch" (kept statistics: O(N·q·d) per step)


def load_image(name: str) -> torch.Tensor:
    """3×H×W float in [0, 1] from scikit-image's bundled data."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo pairs: the left view
        img = img[0]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


class Denoiser(nn.Module):
    """FFDNet/DnCNN-style: conv-ReLU stack on (noisy, σ map), predicts the noise (residual)."""

    def __init__(self, width: int = 32, depth: int = 5):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(4, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_map = sigma.view(-1, 1, 1, 1).expand(-1, 1, *noisy.shape[-2:])
        return noisy - self.body(torch.cat([noisy, sigma_map], dim=1))


def _batches(images, cfg: DemoConfig, generator: torch.Generator):
    """The same sequence of (clean crops, σ, noise) for every run: all randomness from one seed."""
    for _ in range(cfg.steps):
        crops = []
        for _ in range(cfg.batch):
            img = images[int(torch.randint(len(images), (1,), generator=generator))]
            h, w = img.shape[-2:]
            top = int(torch.randint(h - cfg.crop + 1, (1,), generator=generator))
            left = int(torch.randint(w - cfg.crop + 1, (1,), generator=generator))
            crop = img[:, top:top + cfg.crop, left:left + cfg.crop]
            if torch.rand((), generator=generator) < 0.5:
                crop = crop.flip(-1)
            if torch.rand((), generator=generator) < 0.5:
                crop = crop.flip(-2)
            crops.append(crop)
        clean = torch.stack(crops)
        if cfg.sigma is None:
            sigma = torch.rand(cfg.batch, generator=generator) * TRAIN_SIGMA_MAX / 255.0
        else:
            sigma = torch.full((cfg.batch,), cfg.sigma / 255.0)
        noise = torch.randn(clean.shape, generator=generator) * sigma.view(-1, 1, 1, 1)
        yield clean, sigma, noise


def train(cfg: DemoConfig, use_d2sm: bool, images, progress: bool = True):
    """Train one denoiser; returns (model, per-step loss history)."""
    from .loss import D2SMLoss

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = Denoiser(cfg.width, cfg.depth).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.steps, 1))
    crit = None
    if use_d2sm:
        crit = D2SMLoss(sampling=cfg.sampling, patch_size=cfg.crop // 2, stride=cfg.crop // 4, weight=cfg.weight,
                        queue_size=cfg.queue_size).to(device)
    history = {"l1": [], "d2sm": []}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = _progress(cfg.steps, "L1+D2SM" if use_d2sm else "L1", progress)
    for clean, sigma, noise in _batches(images, cfg, gen):
        clean, sigma, noise = clean.to(device), sigma.to(device), noise.to(device)
        restored = model(clean + noise, sigma)
        l1 = F.l1_loss(restored, clean)
        loss = l1
        history["l1"].append(l1.item())
        if crit is not None:
            d2sm = crit(restored.clamp(0, 1), clean)
            loss = loss + d2sm
            history["d2sm"].append(d2sm.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(l1=f"{history['l1'][-1]:.4f}", **({"d2sm": f"{history['d2sm'][-1]:.4f}"} if crit else {}))
    bar.close()
    return model.eval(), history


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"train {desc:>8}", disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def denoise(model: nn.Module, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    device = next(model.parameters()).device
    s = torch.full((1,), sigma / 255.0, device=device)
    return model(noisy[None].to(device), s)[0].clamp(0, 1).cpu()


def noisy_test_set(test_images, seed: int):
    """{σ: [noisy image, …]} with a fixed noise seed, identical for every run."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {s: [(img + torch.randn(img.shape, generator=gen) * s / 255.0) for img in test_images] for s in TEST_SIGMAS}


class SemanticJudge:
    """EfficientNet-Lite2 (ImageNet) top-1 classes of 224×224 tiles."""

    def __init__(self, device: torch.device):
        from .extractors import build_extractor, efficientnet_lite, freeze

        self.net = build_extractor(freeze(efficientnet_lite(2, with_classifier=True))).to(device)
        self.device = device

    @torch.no_grad()
    def classes(self, img: torch.Tensor) -> torch.Tensor:
        from .patches import extract_patches

        tiles = extract_patches(img[None], 224, 224)[0]
        tiles = F.interpolate(tiles, size=(260, 260), mode="bilinear", align_corners=False)  # Lite2's input size
        return self.net(tiles.to(self.device)).argmax(1).cpu()


def evaluate(models: dict, test_images, noisy: dict, judge: SemanticJudge):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    clean_classes = [judge.classes(img) for img in test_images]
    results = {}
    for name, model in models.items():
        per_sigma = {}
        for s in TEST_SIGMAS:
            psnr, ssim, agree, tiles = [], [], 0, 0
            for img, nz, cls in zip(test_images, noisy[s], clean_classes):
                out = denoise(model, nz, s)
                a, b = img.permute(1, 2, 0).numpy(), out.permute(1, 2, 0).numpy()
                psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
                ssim.append(structural_similarity(a, b, data_range=1.0, channel_axis=2))
                pred = judge.classes(out)
                agree += int((pred == cls).sum())
                tiles += cls.numel()
            per_sigma[str(s)] = dict(psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)),
                                     agreement=agree / tiles, tiles=tiles)
        results[name] = per_sigma
    return results


def figure(path: str, models: dict, test_images, noisy: dict, histories: dict, sigma: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(test_images)
    fig, axes = plt.subplots(n + 1, 4, figsize=(12, 3 * (n + 1)))
    for row, (img, nz) in enumerate(zip(test_images, noisy[sigma])):
        h, w = img.shape[-2:]
        side = min(h, w, 160)
        top, left = (h - side) // 2, (w - side) // 2
        panels = [("noisy σ=%d" % sigma, nz.clamp(0, 1))] + [(k, denoise(m, nz, sigma)) for k, m in models.items()]
        panels.append(("clean", img))
        for col, (title, im) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(im[:, top:top + side, left:left + side].permute(1, 2, 0).numpy())
            ax.set_title(title)
            ax.axis("off")
    ax = axes[n, 0]
    for name, hist in histories.items():
        ax.plot(_smooth(hist["l1"]), label=f"{name}: L1")
    ax.set_title("training L1 (smoothed)")
    ax.legend()
    ax = axes[n, 1]
    if histories.get("L1+D2SM", {}).get("d2sm"):
        ax.plot(_smooth(histories["L1+D2SM"]["d2sm"]), color="C1")
    ax.set_title("training D2SM term (L1+D2SM run)")
    for ax in axes[n, 2:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _smooth(values, k: int = 20):
    if len(values) < k:
        return values
    return np.convolve(values, np.ones(k) / k, mode="valid")


def format_table(results: dict) -> str:
    lines = ["| σ | run | PSNR (dB) | SSIM | semantic agreement |", "|---|---|---|---|---|"]
    for s in TEST_SIGMAS:
        for name, per_sigma in results.items():
            r = per_sigma[str(s)]
            lines.append(f"| {s} | {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                         f"{r['agreement']:.2f} ({round(r['agreement'] * r['tiles'])}/{r['tiles']} tiles) |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t0 = time.time()
    train_images = [load_image(n) for n in TRAIN_IMAGES]
    test_images = [load_image(n) for n in TEST_IMAGES[:cfg.max_test_images]]
    models, histories = {}, {}
    for name, use in (("L1", False), ("L1+D2SM", True)):
        models[name], histories[name] = train(cfg, use, train_images, progress)
    noisy = noisy_test_set(test_images, cfg.seed)
    judge = SemanticJudge(torch.device(cfg.device))
    results = evaluate(models, test_images, noisy, judge)
    fig_path = os.path.join(cfg.out, "demo.png")
    figure(fig_path, models, test_images, noisy, histories)
    table = format_table(results)
    report = dict(config=asdict(cfg), results=results, seconds=time.time() - t0, torch=torch.__version__,
                  train_images=TRAIN_IMAGES, test_images=TEST_IMAGES, figure=fig_path,
                  final_train_loss={k: float(np.mean(v["l1"][-20:])) for k, v in histories.items()})
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(table)
    print(f"\nresults: {os.path.join(cfg.out, 'results.json')}  figure: {fig_path}  ({report['seconds']:.0f} s)")
    return report
