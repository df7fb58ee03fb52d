"""The PyTorch peer of vicreg-tf for the benchmarks: same networks, expander, loss, LARS and views.

Runs only in the peer venv (.venv-peer, see bench/requirements-peer.txt); it imports no
TensorFlow. Ports, layer for layer:
- `small_cnn` and `resnet18_cifar` of vicreg_tf/backbones.py (same channels, BN momentum
  0.01 = Keras' 0.99, BN epsilon 1e-3, bias-free convs, Glorot-uniform kernels, input
  normalization inside the network). One difference: TF's "same" padding of a stride-2 3x3
  conv pads (0, 1), PyTorch's padding=1 pads (1, 1); the shapes and FLOPs are equal.
- the expander of vicreg_tf/projector.py (= the official `Projector`).
- `LARS`, `exclude_bias_and_norm` and `adjust_learning_rate`: the official facebookresearch/vicreg
  code (main_vicreg.py), unchanged but for the argument style.
- two losses: lightly's `VICRegLoss` (loaded from lightly's own file, see `lightly_vicreg_loss`)
  and `official_vicreg_loss`, the formula of main_vicreg.py `VICReg.forward`.
- `grayscale_views`: vicreg_tf.augment.grayscale_views as batched tensor ops (torchvision's
  PyPI wheel is built against CUDA torch and does not load next to the +cpu torch here).
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# -- networks --------------------------------------------------------------------------


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _bn2d(width: int) -> nn.BatchNorm2d:
    # Keras defaults: momentum 0.99 (PyTorch counts the other way: 0.01), epsilon 1e-3.
    return nn.BatchNorm2d(width, eps=1e-3, momentum=0.01)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), _bn2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int = 1, widths=(32, 64, 128), mean=FASHION_MNIST_MEAN,
              std=FASHION_MNIST_STD) -> nn.Sequential:
    """vicreg_tf.backbones.small_cnn: stages of two 3x3 Conv-BN-ReLU, max-pool between, GAP."""
    layers: list[nn.Module] = [Normalize(mean, std)]
    cin = in_channels
    for stage, width in enumerate(widths):
        if stage > 0:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += _conv_bn_relu(cin, width)
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return keras_like_init(nn.Sequential(*layers))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = _bn2d(width)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != width:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, width, 1, stride=stride, bias=False), _bn2d(width))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


def resnet18_cifar(in_channels: int = 3, width: int = 64, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Sequential:
    """vicreg_tf.backbones.resnet18_cifar: 3x3 stem, no max-pool, 4 stages of 2 basic blocks, 512 features."""
    layers: list[nn.Module] = [Normalize(mean, std), *_conv_bn_relu(in_channels, width)]
    cin = width
    for stage, multiplier in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            layers.append(BasicBlock(cin, width * multiplier, stride))
            cin = width * multiplier
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return keras_like_init(nn.Sequential(*layers))


def projector(spec: str, in_features: int) -> nn.Sequential:
    """The official `Projector(args, embedding)`: Linear-BN-ReLU blocks, last Linear without bias."""
    sizes = [in_features] + [int(s) for s in spec.split("-")]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return keras_like_init(nn.Sequential(*layers))


def keras_like_init(module: nn.Module) -> nn.Module:
    """Keras' initializers (Glorot-uniform kernels, zero biases), so both sides start alike."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


BACKBONES = {"small_cnn": small_cnn, "resnet18_cifar": resnet18_cifar}
FEATURES = {"small_cnn": 128, "resnet18_cifar": 512}


class VICRegPeer(nn.Module):
    """Backbone + expander; `forward(x)` gives the backbone's features, as vicreg_tf.VICReg.call."""

    def __init__(self, backbone: str, expander: str, in_channels: int):
        super().__init__()
        self.backbone = BACKBONES[backbone](in_channels)
        self.projector = projector(expander, FEATURES[backbone])

    def forward(self, x):
        return self.backbone(x)

    def embed(self, x):
        return self.projector(self.backbone(x))


# -- losses --------------------------------------------------------------------------------


def lightly_vicreg_loss(**kwargs) -> nn.Module:
    """lightly's `VICRegLoss`, loaded from lightly/loss/vicreg_loss.py itself.

    `import lightly.loss` runs lightly/loss/__init__.py, which imports torchvision.ops; the
    PyPI torchvision wheel needs CUDA torch and fails to load here. The loss file needs
    only torch and lightly.utils.dist, so it is executed on its own, unchanged.
    """
    import lightly

    path = os.path.join(os.path.dirname(lightly.__file__), "loss", "vicreg_loss.py")
    spec = importlib.util.spec_from_file_location("lightly.loss.vicreg_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VICRegLoss(**kwargs)


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official_vicreg_loss(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """`VICReg.forward` of facebookresearch/vicreg main_vicreg.py after the projector (one process)."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(cov_y).pow_(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def make_loss(name: str):
    if name == "lightly":
        return lightly_vicreg_loss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)
    if name == "official":
        return official_vicreg_loss
    raise ValueError(f"unknown loss {name!r}; expected 'lightly' or 'official'")


# -- optimizer (official code) ---------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """facebookresearch/vicreg main_vicreg.py `LARS`, unchanged."""

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if g["weight_decay_filter"] is None or not g["weight_decay_filter"](p):
                    dp = dp.add(p, alpha=g["weight_decay"])
                if g["lars_adaptation_filter"] is None or not g["lars_adaptation_filter"](p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def exclude_bias_and_norm(p):
    return p.ndim == 1


def make_lars(model: nn.Module, lr: float, weight_decay: float, eta: float = 0.001) -> LARS:
    return LARS(model.parameters(), lr=lr, weight_decay=weight_decay, eta=eta,
                weight_decay_filter=exclude_bias_and_norm, lars_adaptation_filter=exclude_bias_and_norm)


def adjust_learning_rate(optimizer, step: int, max_steps: int, warmup_steps: int, base_lr: float) -> float:
    """The official schedule: linear warmup, then cosine to 0.001 x base_lr (base_lr already scaled)."""
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        end_lr = base_lr * 0.001
        lr = base_lr * q + end_lr * (1 - q)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def train_step(model: VICRegPeer, optimizer, loss_fn, view_a, view_b) -> torch.Tensor:
    """One VICReg step as in the official training loop (fp32, no autocast on CPU)."""
    optimizer.zero_grad()
    loss = loss_fn(model.embed(view_a), model.embed(view_b))
    loss.backward()
    optimizer.step()
    return loss.detach()


# -- views (vicreg_tf.augment.grayscale_views as tensor ops) -------------------------------


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator)


def random_resized_crop(x, area, aspect, generator, attempts: int = 10):
    """torchvision's sampling (10 tries, center-crop fallback) + bilinear resize with
    tf.image.crop_and_resize's geometry (box corners at pixel centres = align_corners=True)."""
    n, _, h, w = x.shape
    target = h * w * _uniform((n, attempts), *area, generator)
    ratio = torch.exp(_uniform((n, attempts), math.log(aspect[0]), math.log(aspect[1]), generator))
    cw = torch.round(torch.sqrt(target * ratio))
    ch = torch.round(torch.sqrt(target / ratio))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    any_fits = fits.any(dim=1)
    cw = torch.where(any_fits, cw, torch.full_like(cw, float(w)))  # square images: fallback is the full image
    ch = torch.where(any_fits, ch, torch.full_like(ch, float(h)))
    top = torch.where(any_fits, torch.floor(torch.rand(n, generator=generator) * (h - ch + 1)),
                      torch.floor((h - ch) / 2))
    left = torch.where(any_fits, torch.floor(torch.rand(n, generator=generator) * (w - cw + 1)),
                       torch.floor((w - cw) / 2))
    # pixel-centre coordinates -> [-1, 1] with align_corners=True
    x0, x1 = 2 * left / (w - 1) - 1, 2 * (left + cw - 1) / (w - 1) - 1
    y0, y1 = 2 * top / (h - 1) - 1, 2 * (top + ch - 1) / (h - 1) - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0) / 2, (x1 + x0) / 2
    theta[:, 1, 1], theta[:, 1, 2] = (y1 - y0) / 2, (y1 + y0) / 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def _where_images(mask, a, b):
    return torch.where(mask[:, None, None, None], a, b)


def _symmetric_pad(x, r: int):
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


def gaussian_blur(x, probability, sigma, generator):
    n, c, h, w = x.shape
    apply = torch.rand(n, generator=generator) < probability
    sigmas = _uniform(n, *sigma, generator)
    idx = torch.nonzero(apply)[:, 0]
    if len(idx) == 0:
        return x
    r = min(math.ceil(3 * sigma[1]), h, w)
    taps = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigmas[idx, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c, 2r+1)
    sub = _symmetric_pad(x[idx].reshape(1, -1, h, w), r)
    sub = F.conv2d(sub, kernel[:, None, None, :], groups=sub.shape[1])
    sub = F.conv2d(sub, kernel[:, None, :, None], groups=sub.shape[1])
    out = x.clone()
    out[idx] = sub.reshape(len(idx), c, h, w)
    return out


def gray_jitter(x, probability, brightness, contrast, generator):
    """torchvision's ColorJitter on one-channel images (vicreg_tf.augment.RandomColorJitter):
    brightness (multiply) and contrast (blend with the image's mean), factors uniform in
    [max(0, 1 - s), 1 + s], in a random order per image, each result clipped to [0, 1]."""
    n = x.shape[0]
    apply = torch.rand(n, generator=generator) < probability
    f_b = _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator)[:, None, None, None]
    f_c = _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator)[:, None, None, None]
    contrast_first = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None]

    def do_brightness(y):
        return (y * f_b).clamp(0, 1)

    def do_contrast(y):
        return (f_c * y + (1 - f_c) * y.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)

    jittered = torch.where(contrast_first, do_brightness(do_contrast(x)), do_contrast(do_brightness(x)))
    return _where_images(apply, jittered, x)


def view(x, generator, *, crop_area, crop_aspect, flip_prob, blur_prob, blur_sigma, solarize_prob, threshold=0.5,
         jitter_prob=0.0, brightness=0.0, contrast=0.0):
    n = x.shape[0]
    x = random_resized_crop(x, crop_area, crop_aspect, generator)
    x = _where_images(torch.rand(n, generator=generator) < flip_prob, x.flip(-1), x)
    if jitter_prob > 0:
        x = gray_jitter(x, jitter_prob, brightness, contrast, generator)
    if blur_prob > 0:
        x = gaussian_blur(x, blur_prob, blur_sigma, generator)
    if solarize_prob > 0:
        solarized = torch.where(x >= threshold, 1.0 - x, x)
        x = _where_images(torch.rand(n, generator=generator) < solarize_prob, solarized, x)
    return x


def grayscale_views(x, generator):
    """vicreg_tf.augment.grayscale_views: crop 0.2-1, flip, brightness/contrast jitter p 0.8
    (strengths 0.4), blur 0.5 / 0.1 (sigma 0.1-1), solarize 0 / 0.2."""
    common = dict(crop_area=(0.2, 1.0), crop_aspect=(3 / 4, 4 / 3), flip_prob=0.5, blur_sigma=(0.1, 1.0),
                  jitter_prob=0.8, brightness=0.4, contrast=0.4)
    view_a = view(x, generator, blur_prob=0.5, solarize_prob=0.0, **common)
    view_b = view(x, generator, blur_prob=0.1, solarize_prob=0.2, **common)
    return view_a, view_b
