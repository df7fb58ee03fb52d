"""The VICReg family at equal budget on Fashion-MNIST: which method wins, with numbers.

Usage: python -m bench.family [--limit 10000 --epochs 2] [--eval-train 2000 --eval-test 1000]
           [--only vicreg,simsiam,...] [--seed 0] [--out family]

Every row trains the same small CNN (vicreg_tf.backbones.small_cnn, 128 features) from the
same initial weights, on the first --limit training images, with the recipe of
configs/fashion_mnist.py and bench/quality.py: expander 1024-1024-1024, batch 256, LARS
(base lr 0.3 x batch / 256, eta 0.02, weight decay 1e-4), 1 warm-up epoch then cosine, the
views of vicreg_tf.augment.grayscale_views, the same view seed and order. Only the method
differs (vicreg_tf.methods; predictor hidden width 256 for SimSiam, 1024 for BYOL, as in
configs/fashion_mnist_{simsiam,byol}.py). Rows:

  vicreg            VICReg 25/25/1
  simsiam           SimSiam (predictor, stop-gradient)
  simsiam_vc        SimSiam + VICReg's variance (1) and covariance (0.01) on the expander outputs
  byol              BYOL (EMA target, tau 0.996 -> 1 cosine)
  byol_v            BYOL + VICReg's variance (1)
  logdet            invariance - LogDet entropy (arXiv 2303.00633)
  pairwise          invariance - pairwise-distance entropy (Kolchinsky-Tracey KL bound)
  random            the same CNN, untrained (the floor)

Evaluation (bench/quality.py's NumPy kNN and probe, the same for every row): backbone features
(BatchNorm in inference mode) of the first --eval-train training and --eval-test test images;
kNN k=20 cosine T=0.07, and a linear probe (softmax regression, --probe-epochs of Adam).
Rows run one after another in this process; results go to bench/results/OUT.{json,md} after
each row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.quality import DATA, RECIPE, knn_accuracy, linear_probe_accuracy, load_fashion_mnist
from bench.throughput import machine, md_table, write_results

ROWS = {
    "vicreg": ("VICReg (25/25/1)", dict(method="vicreg")),
    "simsiam": ("SimSiam", dict(method="simsiam")),
    "simsiam_vc": ("SimSiam + variance 1 + covariance 0.01",
                   dict(method="simsiam", variance_weight=1.0, covariance_weight=0.01)),
    "byol": ("BYOL", dict(method="byol")),
    "byol_v": ("BYOL + variance 1", dict(method="byol", variance_weight=1.0)),
    "logdet": ("LogDet entropy (beta 1e-3)", dict(method="logdet")),
    "pairwise": ("pairwise-distance entropy (width sqrt(D))", dict(method="pairwise")),
    "random": ("random-weight CNN (no training)", dict(method=None)),
}


def build(method: str | None, backbone, total_steps: int, **weights):
    import vicreg_tf

    expander = RECIPE["expander"]
    if method == "vicreg":
        return vicreg_tf.VICReg(backbone, projector=expander)
    if method == "simsiam":
        return vicreg_tf.SimSiam(backbone, expander, predictor="256", **weights)
    if method == "byol":
        return vicreg_tf.BYOL(backbone, expander, predictor="1024", total_steps=total_steps, **weights)
    return vicreg_tf.EntropyVICReg(backbone, expander, entropy=method)


def run_row(name: str, args, x_train, x_eval_train, x_eval_test) -> dict:
    import vicreg_tf  # before keras / tensorflow, as users do

    # isort: split
    import keras
    import numpy as np

    from vicreg_tf import augment, backbones, data

    keras.backend.clear_session()
    keras.utils.set_random_seed(args.seed)
    backbone = backbones.small_cnn((28, 28, 1))  # same seed: same initial weights in every row
    _, spec = ROWS[name]
    info = {}
    if spec["method"] is not None:
        batch = RECIPE["batch"]
        steps = len(x_train) // batch
        total = steps * args.epochs
        warmup = min(steps * RECIPE["warmup_epochs"], total - 1)
        lr = vicreg_tf.warmup_cosine(vicreg_tf.scaled_learning_rate(RECIPE["base_lr"], batch), total, warmup,
                                     RECIPE["final_fraction"])
        spec = dict(spec)
        model = build(spec.pop("method"), backbone, total, **spec)
        model.compile(optimizer=vicreg_tf.LARS(lr, weight_decay=RECIPE["weight_decay"], eta=RECIPE["eta"]))
        # The trainer's input pipeline (vicreg_tf.data.view_pair_batches) on the uint8 arrays.
        source = data.ArraySource(np.round(x_train * 255).astype(np.uint8))
        dataset = data.view_pair_batches(source, augment.grayscale_views(28, seed=args.seed), batch,
                                         steps_per_epoch=steps, epochs=args.epochs, seed=args.seed)
        t0 = time.perf_counter()
        history = model.fit(dataset, epochs=args.epochs, steps_per_epoch=steps, verbose=2,
                            callbacks=[vicreg_tf.StopOnNonFiniteLoss()])
        info.update(train_s=time.perf_counter() - t0, steps=total,
                    final_metrics={k: float(v[-1]) for k, v in history.history.items()})
    features = [backbone.predict(x, batch_size=1024, verbose=0) for x in (x_eval_train, x_eval_test)]
    info["feature_std"] = float(features[0].std(axis=0).mean())
    return info, features


def markdown(payload: dict) -> str:
    m = payload["machine"]
    text = [f"Machine: {m['cpu']}, {m['cores']} cores; date {m['date']}. Command: `{payload['command']}`. "
            f"Fashion-MNIST, small CNN (128 features), {payload['epochs']} epoch(s) on the first "
            f"{payload['train_images']} training images, seed {payload['seed']}, batch {RECIPE['batch']}, expander "
            f"{RECIPE['expander']}, LARS + warmup-cosine (configs/fashion_mnist.py). kNN k=20 cosine T=0.07 and a "
            f"linear probe ({payload['probe_epochs']} epochs, NumPy) on the features of the first "
            f"{payload['eval_train']} train / {payload['eval_test']} test images.\n"]
    rows = []
    for name, r in payload["rows"].items():
        label = ROWS[name][0]
        if "error" in r:
            rows.append([label, r["error"], "", "", "", ""])
            continue
        final = r.get("final_metrics", {})
        wall = f"{r['train_s']:.0f}" if r.get("train_s") else "-"
        loss = f"{final['loss']:.3f}" if "loss" in final else "-"
        std = f"{final['embedding_std']:.3f}" if "embedding_std" in final else "-"
        rows.append([label, f"{100 * r['linear']:.1f}", f"{100 * r['knn']:.1f}", loss, std, wall])
    text.append(md_table(["method", "linear probe top-1 %", "kNN-20 top-1 %", "final loss",
                          "expander output std", "training wall s"], rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=10000, help="train on the first N training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-train", type=int, default=2000, help="kNN / probe training set: first N train images")
    parser.add_argument("--eval-test", type=int, default=1000, help="evaluation set: first N test images")
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--only", default=",".join(ROWS), help="rows, from " + ",".join(ROWS))
    parser.add_argument("--seed", type=int, default=RECIPE["seed"])
    parser.add_argument("--out", default="family", help="name of the result files in bench/results")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {list(ROWS)}")
    if not (Path(args.data) / "train-images-idx3-ubyte.gz").exists():
        print(f"note: Fashion-MNIST not found in {args.data} (apt-get install dataset-fashion-mnist); skipped")
        return 0
    x_train, y_train, x_test, y_test = load_fashion_mnist(Path(args.data))
    eval_sets = (x_train[: args.eval_train], y_train[: args.eval_train],
                 x_test[: args.eval_test], y_test[: args.eval_test])
    payload = {"machine": {**machine(), "date": time.strftime("%Y-%m-%d")}, "epochs": args.epochs,
               "train_images": args.limit, "eval_train": args.eval_train,
               "eval_test": args.eval_test, "probe_epochs": args.probe_epochs, "seed": args.seed, "recipe": RECIPE,
               "command": "python -m bench.family " + " ".join(argv), "rows": {}}
    for name in names:
        t0 = time.perf_counter()
        try:
            info, (f_train, f_test) = run_row(name, args, x_train[: args.limit], eval_sets[0], eval_sets[2])
        except Exception as error:  # one failing method (e.g. a NaN loss) must not lose the others
            print(f"  {name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            payload["rows"][name] = {"error": f"failed: {type(error).__name__}"}
            write_results(args.out, payload, markdown(payload))
            continue
        info["knn"] = knn_accuracy(f_train, eval_sets[1], f_test, eval_sets[3])
        info["linear"] = linear_probe_accuracy(f_train, eval_sets[1], f_test, eval_sets[3], epochs=args.probe_epochs)
        info["row_s"] = time.perf_counter() - t0
        payload["rows"][name] = info
        print(f"  {name}: linear {100 * info['linear']:.1f}%, kNN {100 * info['knn']:.1f}% "
              f"({info['row_s']:.0f} s)", flush=True)
        write_results(args.out, payload, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
