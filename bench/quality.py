"""Learning quality at equal budget on Fashion-MNIST: vicreg-tf against the PyTorch peer, plus baselines.

Usage: python -m bench.quality [--epochs 5] [--limit 0] [--only tf_vicreg,torch_vicreg,...]
           [--seed 0 --out quality] [--data /usr/share/datasets/fashion-mnist]

Another --seed (with its own --out) repeats the trained rows with other initial weights,
views and order: the run-to-run spread that a difference between rows has to beat.

Both sides train the same small CNN (vicreg_tf.backbones.small_cnn / its port in
bench/peer_torch.py) with the recipe of configs/fashion_mnist.py: expander 1024-1024-1024,
loss weights 25/25/1, batch 256, LARS (base lr 0.3 x batch / 256, weight decay 1e-4,
eta 0.02, 1-D parameters excluded), 1 warm-up epoch then cosine to 0.001 x peak, the same
number of epochs, and the views of vicreg_tf.augment.grayscale_views (crop area 0.2-1,
flip, brightness/contrast jitter p 0.8 with strengths 0.4, blur p 0.5 / 0.1 with sigma
0.1-1, solarize p 0 / 0.2). vicreg-tf uses its own
pipeline (vicreg_tf.data.view_pair_batches on the uint8 arrays, as vicreg-train); PyTorch uses lightly's VICRegLoss, the
official LARS and schedule and bench.peer_torch.grayscale_views. Each side writes the
backbone's features of the 60000 train and 10000 test images (BatchNorm in inference mode)
to bench/results/quality/*.npy; one NumPy evaluation scores every row the same way:
- kNN: k=20, cosine similarity, votes weighted by exp(similarity / 0.07);
- linear probe: softmax regression on standardized features, Adam, --probe-epochs.
Baselines: the same CNN with random weights, raw pixels, and the CNN trained supervised
(cross-entropy, one view of the same augmentation, same optimizer, schedule and epochs: a
ceiling at this budget). Each training runs in its own child process, one after another.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.throughput import MAIN_PYTHON, PEER_PYTHON, RESULTS, ROOT, machine, md_table, write_results

DATA = Path(os.environ.get("VICREG_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
OUT = RESULTS / "quality"
STAGES = ("tf_vicreg", "torch_vicreg", "tf_supervised", "tf_random", "pixels")
LABELS = {
    "tf_vicreg": "vicreg-tf VICReg",
    "torch_vicreg": "PyTorch + lightly VICRegLoss",
    "tf_supervised": "supervised, same CNN (ceiling)",
    "tf_random": "random-weight CNN",
    "pixels": "raw pixels",
}
RECIPE = dict(expander="1024-1024-1024", batch=256, base_lr=0.3, weight_decay=1e-4, eta=0.02, warmup_epochs=1,
              final_fraction=0.001, seed=0)
PROTOCOL = "@@"


# -- data ---------------------------------------------------------------------------------------


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: Path = DATA):
    """(x_train, y_train, x_test, y_test): float32 NHWC images in [0, 1], int64 labels."""
    parts = []
    for split in ("train", "t10k"):
        x = _idx(data_dir / f"{split}-images-idx3-ubyte.gz").astype(np.float32)[..., None] / 255.0
        y = _idx(data_dir / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        parts += [x, y]
    return tuple(parts)


def _schedule(n_train: int, epochs: int) -> tuple[int, int, int]:
    steps = n_train // RECIPE["batch"]
    total = steps * epochs
    return steps, total, min(steps * RECIPE["warmup_epochs"], total - 1)


# -- evaluation (NumPy only, the same for every row) ------------------------------------------------


def knn_accuracy(train, train_y, test, test_y, k: int = 20, temperature: float = 0.07, classes: int = 10) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018; as in DINO / solo-learn)."""
    train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    correct = 0
    for start in range(0, len(test), 500):
        sim = test[start:start + 500] @ train.T
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)
        votes = np.zeros((len(sim), classes))
        np.add.at(votes, (np.arange(len(sim))[:, None], train_y[top]), weights)
        correct += int((votes.argmax(1) == test_y[start:start + 500]).sum())
    return correct / len(test)


def linear_probe_accuracy(train, train_y, test, test_y, epochs: int = 30, batch: int = 256, lr: float = 1e-3,
                          weight_decay: float = 1e-4, classes: int = 10, seed: int = 0) -> float:
    """Softmax regression on standardized features, Adam with cosine decay, fixed seed."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)
    rng = np.random.default_rng(seed)
    w = np.zeros((train.shape[1], classes), np.float32)
    b = np.zeros(classes, np.float32)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    onehot = np.eye(classes, dtype=np.float32)
    steps_per_epoch = len(train) // batch
    total, t = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            logits = train[idx] @ w + b
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            g = (p - onehot[train_y[idx]]) / len(idx)
            grads = [train[idx].T @ g + weight_decay * w, g.sum(0)]
            t += 1
            step_lr = lr * 0.5 * (1 + np.cos(np.pi * t / total))
            for param, grad, m_, v_ in zip((w, b), grads, m, v):
                m_ *= 0.9
                m_ += 0.1 * grad
                v_ *= 0.999
                v_ += 0.001 * grad * grad
                param -= step_lr * (m_ / (1 - 0.9**t)) / (np.sqrt(v_ / (1 - 0.999**t)) + 1e-8)
    return float(((test @ w + b).argmax(1) == test_y).mean())


# -- training children ----------------------------------------------------------------------------------


def _prefix(seed: int) -> str:
    """File-name prefix of a run's features and logs: none for the recipe's seed."""
    return "" if seed == RECIPE["seed"] else f"seed{seed}_"


def _tf_child(task: dict) -> dict:
    import vicreg_tf  # first, as the README asks of users (bench/__init__.py has set oneDNN on already)

    # isort: split
    import keras
    import tensorflow as tf

    from vicreg_tf import augment, backbones, data

    seed = task["seed"]
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, _ = load_fashion_mnist(Path(task["data"]))
    pre = x_train[: task["limit"] or None]
    steps, total, warmup = _schedule(len(pre), task["epochs"])
    batch = RECIPE["batch"]
    backbone = backbones.small_cnn((28, 28, 1))
    info = {}
    if task["stage"] in ("tf_vicreg", "tf_supervised"):
        peak = vicreg_tf.scaled_learning_rate(RECIPE["base_lr"], batch)
        lr = vicreg_tf.warmup_cosine(peak, total, warmup, RECIPE["final_fraction"])
        optimizer = vicreg_tf.LARS(lr, weight_decay=RECIPE["weight_decay"], eta=RECIPE["eta"])
        views = augment.grayscale_views(28, seed=seed)
        if task["stage"] == "tf_vicreg":
            model = vicreg_tf.VICReg(backbone, projector=RECIPE["expander"])
            # The trainer's input pipeline on Fashion-MNIST: uint8 arrays, rows cropped, then the views.
            source = data.ArraySource(np.round(pre * 255).astype(np.uint8))
            dataset = data.view_pair_batches(source, views, batch, steps_per_epoch=steps, epochs=task["epochs"],
                                             seed=seed)
            model.compile(optimizer=optimizer)
        else:
            inputs = keras.Input((28, 28, 1))
            model = keras.Model(inputs, keras.layers.Dense(10)(backbone(inputs)))
            labelled = tf.data.Dataset.from_tensor_slices((pre, y_train[: len(pre)]))
            dataset = tf.data.Dataset.zip((
                labelled.shuffle(len(pre), seed=seed).repeat().batch(batch, drop_remainder=True),
                tf.data.Dataset.random(seed).batch(2),
            )).map(lambda xy, pair_seed: (views.view_a(xy[0], seed=pair_seed), xy[1]),
                   num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.prefetch(tf.data.AUTOTUNE)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])
        t0 = time.perf_counter()
        history = model.fit(dataset, epochs=task["epochs"], steps_per_epoch=steps, verbose=2)
        info.update(train_s=time.perf_counter() - t0, steps=total,
                    final_metrics={k: float(v[-1]) for k, v in history.history.items()})
    n = task.get("eval_limit") or None
    for name, x in (("train", x_train[:n]), ("test", x_test[:n])):
        np.save(OUT / f"{_prefix(seed)}{task['stage']}_{name}.npy", backbone.predict(x, batch_size=1024, verbose=0))
    return info


def _torch_child(task: dict) -> dict:
    import torch

    from bench import peer_torch

    seed = task["seed"]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, _, x_test, _ = load_fashion_mnist(Path(task["data"]))
    images = torch.from_numpy(x_train[: task["limit"] or None]).permute(0, 3, 1, 2).contiguous()
    steps, total, warmup = _schedule(len(images), task["epochs"])
    batch = RECIPE["batch"]
    base_lr = RECIPE["base_lr"] * batch / 256
    model = peer_torch.VICRegPeer("small_cnn", RECIPE["expander"], 1).train()
    optimizer = peer_torch.make_lars(model, lr=base_lr, weight_decay=RECIPE["weight_decay"], eta=RECIPE["eta"])
    loss_fn = peer_torch.make_loss("lightly")
    step, t0, augment_s = 0, time.perf_counter(), 0.0
    for epoch in range(task["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        losses = []
        for i in range(steps):
            a0 = time.perf_counter()
            view_a, view_b = peer_torch.grayscale_views(images[order[i * batch:(i + 1) * batch]], generator)
            augment_s += time.perf_counter() - a0
            peer_torch.adjust_learning_rate(optimizer, step, total, warmup, base_lr)
            losses.append(float(peer_torch.train_step(model, optimizer, loss_fn, view_a, view_b)))
            step += 1
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
              flush=True)
    info = {"train_s": time.perf_counter() - t0, "augment_s": augment_s, "steps": total,
            "final_metrics": {"loss": float(np.mean(losses))}}
    model.eval()
    with torch.no_grad():
        n = task.get("eval_limit") or None
        for name, x in (("train", x_train[:n]), ("test", x_test[:n])):
            x = torch.from_numpy(x).permute(0, 3, 1, 2)
            feats = torch.cat([model(x[i:i + 1024]) for i in range(0, len(x), 1024)])
            np.save(OUT / f"{_prefix(seed)}{task['stage']}_{name}.npy", feats.numpy())
    return info


def _run_child(stage: str, args) -> dict:
    python = Path(args.peer_python) if stage.startswith("torch") else MAIN_PYTHON
    task = {"stage": stage, "epochs": args.epochs, "limit": args.limit, "data": str(args.data),
            "eval_limit": args.eval_limit, "seed": args.seed}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    log_path = OUT / f"{_prefix(args.seed)}{stage}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([str(python), "-m", "bench.quality", "--child", json.dumps(task)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL):])
    raise RuntimeError(f"{stage} failed (rc={proc.returncode}); see {log_path}")


# -- the parent --------------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    machine = payload["machine"]
    evaluated = (f"the first {payload['eval_limit']} train / test images" if payload.get("eval_limit")
                 else "the 60000 train / 10000 test images")
    text = [f"Machine: {machine['cpu']}, {machine['cores']} cores; date {machine['date']}. "
            f"Fashion-MNIST, small CNN (128 features), {payload['epochs']} epoch(s) on "
            f"{payload['train_images']} training images, seed {payload['seed']}, batch {RECIPE['batch']}, "
            f"expander {RECIPE['expander']}, "
            f"LARS + warmup-cosine (configs/fashion_mnist.py). kNN k=20 cosine T=0.07 and a linear probe "
            f"({payload['probe_epochs']} epochs, NumPy) on the features of "
            f"{evaluated}. "
            f"Rows trained {payload.get('jobs', 1)} at a time (wall times share the 2 cores and other users' load).\n"]
    rows = []
    for stage, r in payload["rows"].items():
        if "error" in r:
            rows.append([LABELS[stage], r["error"], "", "", ""])
            continue
        wall = f"{r['train_s']:.0f}" if r.get("train_s") else "-"
        speed = f"{r['steps'] * RECIPE['batch'] / r['train_s']:.0f}" if r.get("train_s") else "-"
        rows.append([LABELS[stage], f"{100 * r['linear']:.1f}", f"{100 * r['knn']:.1f}", wall, speed])
    text.append(md_table(["representation", "linear probe top-1 %", "kNN-20 top-1 %", "training wall s",
                          "train images/s"], rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5,
                        help="training epochs, the same for every trained row (configs/fashion_mnist.py: 5)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N training images (0: all 60000)")
    parser.add_argument("--only", default=",".join(STAGES), help="rows to compute, from " + ",".join(STAGES))
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--eval-limit", type=int, default=0,
                        help="evaluate on the first N train and test images (0: all; for smoke tests)")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once (1: one after another)")
    parser.add_argument("--seed", type=int, default=RECIPE["seed"],
                        help="seed of the trained rows (weights, views, order)")
    parser.add_argument("--out", default="quality", help="name of the result files in bench/results")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.child:
        task = json.loads(args.child)
        info = (_torch_child if task["stage"].startswith("torch") else _tf_child)(task)
        print(PROTOCOL + json.dumps(info), flush=True)
        return 0
    if not (Path(args.data) / "train-images-idx3-ubyte.gz").exists():
        print(f"note: Fashion-MNIST not found in {args.data} (apt-get install dataset-fashion-mnist); quality skipped")
        return 0
    x_train, y_train, x_test, y_test = load_fashion_mnist(Path(args.data))
    if args.eval_limit:
        x_train, y_train = x_train[: args.eval_limit], y_train[: args.eval_limit]
        x_test, y_test = x_test[: args.eval_limit], y_test[: args.eval_limit]
    payload = {"machine": machine(), "epochs": args.epochs, "train_images": args.limit or 60000,
               "eval_limit": args.eval_limit,
               "probe_epochs": args.probe_epochs, "recipe": RECIPE, "seed": args.seed, "rows": {}, "jobs": args.jobs,
               "command": "python -m bench.quality " + " ".join(argv)}
    previous = RESULTS / f"{args.out}.json"
    if previous.exists():  # keep rows of an earlier run with the same settings (--only reruns some)
        old = json.loads(previous.read_text())
        if all(old.get(k) == payload[k] for k in ("epochs", "train_images", "eval_limit", "seed")):
            payload["rows"] = old.get("rows", {})
    stages = [s for s in args.only.split(",") if s]
    for stage in stages:
        if stage not in STAGES:
            raise SystemExit(f"unknown row {stage!r}; expected some of {STAGES}")
    if not Path(args.peer_python).exists():
        print(f"note: {args.peer_python} missing, PyTorch rows skipped (see bench/requirements-peer.txt)")
        stages = [s for s in stages if not s.startswith("torch")]

    def train(stage):
        t0 = time.perf_counter()
        info = {} if stage == "pixels" else _run_child(stage, args)
        info["child_s"] = time.perf_counter() - t0
        return info

    # --jobs > 1 trains rows side by side (their wall times then share the cores).
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(train, stage): stage for stage in stages}
        for future in concurrent.futures.as_completed(futures):
            stage = futures[future]
            try:
                info = future.result()
            except RuntimeError as error:
                print(f"  {stage}: {error}", flush=True)
                payload["rows"][stage] = {"error": "failed, see bench/results/quality/" + stage + ".log"}
                continue
            if stage == "pixels":
                train_x, test_x = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
            else:
                features = OUT / f"{_prefix(args.seed)}{stage}"
                train_x, test_x = np.load(f"{features}_train.npy"), np.load(f"{features}_test.npy")
            info["knn"] = knn_accuracy(train_x, y_train, test_x, y_test)
            info["linear"] = linear_probe_accuracy(train_x, y_train, test_x, y_test, epochs=args.probe_epochs)
            info["jobs"] = args.jobs
            payload["rows"][stage] = info
            print(f"  {stage}: linear {100 * info['linear']:.1f}%, kNN {100 * info['knn']:.1f}%", flush=True)
            write_results(args.out, payload, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
