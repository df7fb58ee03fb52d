"""FLOPs of one VICReg train step, achieved GFLOP/s, and the fraction of this CPU's matmul peak.

Usage: python -m bench.flops [--networks small_cnn,resnet18_cifar] [--batch 256]
           [--expander 2048-2048-2048] [--reps 3] [--matmul 2048]

FLOPs are counted, not estimated from time:
- vicreg-tf: the XLA HLO of the whole train step (`VICReg.train_step` under
  `tf.function(jit_compile=True)`, `experimental_get_compiler_ir(...)(stage="hlo")`, before
  optimization), summing 2 x output elements x contraction size over every `convolution`
  and `dot` (forward, both backward convolutions, expander, loss and its gradient).
  Elementwise work (BN, ReLU, LARS) is not counted: it is small in FLOPs but not in time.
- PyTorch: `torch.utils.flop_counter.FlopCounterMode` over one step (conv, mm, addmm, bmm,
  einsum, forward and backward), with the lightly loss and with the official formula.
Step times come from bench/results/throughput.json (run bench.throughput first; a network
missing there is timed here with a few steps). The machine's peak is measured: float32
matmul (--matmul)^2 in TensorFlow and in PyTorch, each in its own process, alternating,
median of --reps; the better of the two is the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.throughput import LABELS, MAIN_PYTHON, NETWORKS, PEER_PYTHON, RESULTS, ROOT, machine, md_table, write_results

PROTOCOL = "@@"

_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_flops(hlo: str) -> dict:
    """2 x output elements x contraction size over every convolution and dot of an HLO module."""
    conv = dot = 0
    for line in hlo.splitlines():
        line = line.strip()
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (\w+)\[([0-9,]*)\][^ ]* (convolution|dot)\((.*)", line)
        if not m:
            continue
        out = 1
        for d in _dims(m.group(2)):
            out *= d
        operands = _SHAPE.findall(m.group(4).split(")", 1)[0])
        if m.group(3) == "dot":
            lhs = _dims(operands[0])
            contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
            k = 1
            for i in _dims(contracting.group(1)) if contracting else []:
                k *= lhs[i]
            dot += 2 * out * k
        else:
            rhs = _dims(operands[1])
            labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
            feature_group = re.search(r"feature_group_count=(\d+)", line)
            # MACs per output element: the kernel's spatial window x its input features.
            k = 1
            for label, size in zip(labels, rhs):
                if label != "o":
                    k *= size
            conv += 2 * out * k
            del feature_group  # the kernel's 'i' dimension is already per group
    return {"conv": conv, "dot": dot, "total": conv + dot}


def _theoretical_peak() -> float | None:
    """cores x MHz x 32 FLOP/cycle (two 256-bit FMA pipes, float32), for AVX2 CPUs such as Zen 2/3."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        mhz = float(next(line for line in lines if line.startswith("cpu MHz")).split(":")[1])
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration, ValueError):
        return None
    if " fma" not in flags or " avx2" not in flags:
        return None
    return (os.cpu_count() or 1) * mhz * 32 / 1000


def _format_peak(gflops: float | None) -> str:
    return f"{gflops:.0f}" if gflops else "unknown here"


# -- child processes ---------------------------------------------------------------------------


def _matmul_gflops(mm, n: int, calls: int = 10) -> float:
    mm()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        mm()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _tf_child(task: dict) -> dict:
    import vicreg_tf  # first, as users do: it decides TensorFlow's oneDNN default

    # isort: split
    import numpy as np
    import tensorflow as tf

    if task["what"] == "matmul":
        n = task["n"]
        a = tf.random.normal((n, n))
        b = tf.random.normal((n, n))
        return {"gflops": _matmul_gflops(lambda: tf.matmul(a, b).numpy(), n)}
    from vicreg_tf import backbones

    h, w, c = NETWORKS[task["network"]]
    batch = task["batch"]
    model = vicreg_tf.VICReg(getattr(backbones, task["network"])((h, w, c)), projector=task["expander"])
    model.compile(optimizer=vicreg_tf.LARS(0.2, weight_decay=1e-6), jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    views = [tf.constant(np.random.default_rng(0).random((batch, h, w, c), dtype=np.float32)) for _ in range(2)]

    @tf.function(jit_compile=True)
    def step(a, b):
        return model.train_step((a, b))

    hlo = step.experimental_get_compiler_ir(*views)(stage="hlo")
    out = hlo_flops(hlo)
    if task.get("time_steps"):
        step(*views)
        times = []
        for _ in range(task["time_steps"]):
            t0 = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), step(*views))
            times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
    return out


def _torch_child(task: dict) -> dict:
    import torch

    if task["what"] == "matmul":
        n = task["n"]
        a, b = torch.randn(n, n), torch.randn(n, n)
        return {"gflops": _matmul_gflops(lambda: torch.mm(a, b), n)}
    from torch.utils.flop_counter import FlopCounterMode

    from bench import peer_torch

    h, w, c = NETWORKS[task["network"]]
    out = {}
    for loss in ("lightly", "official"):
        model = peer_torch.VICRegPeer(task["network"], task["expander"], c).train()
        optimizer = peer_torch.make_lars(model, lr=0.2, weight_decay=1e-6)
        views = [torch.rand(task["batch"], c, h, w) for _ in range(2)]
        with FlopCounterMode(display=False) as counter:
            peer_torch.train_step(model, optimizer, peer_torch.make_loss(loss), *views)
        out[f"torch_{loss}"] = counter.get_total_flops()
    return out


def _child_main(task: dict) -> None:
    result = (_tf_child if task["library"] == "tf" else _torch_child)(task)
    print(PROTOCOL + json.dumps(result), flush=True)


def _ask(library: str, task: dict, peer_python: Path) -> dict:
    python = MAIN_PYTHON if library == "tf" else peer_python
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    import os

    proc = subprocess.run([str(python), "-m", "bench.flops", "--child", json.dumps({"library": library, **task})],
                          cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL):])
    raise RuntimeError(f"{library} child failed (rc={proc.returncode}): {proc.stderr[-2000:]}")


# -- the parent ------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    peak = payload["matmul_peak_gflops"]
    m = payload["matmul"]
    machine = payload["machine"]
    text = [f"Machine: {machine['cpu']}, {machine['cores']} cores; date {machine['date']}. "
            f"Peak reference: float32 {payload['matmul_n']}x{payload['matmul_n']} matmul, median GFLOP/s over "
            f"{payload['reps']} alternating runs: TensorFlow {statistics.median(m['tf']):.1f}, PyTorch "
            f"{statistics.median(m['torch']):.1f} (reference {peak:.1f}; the paper peak, cores x clock x 32 FLOP/cycle "
            f"for AVX2 with two FMA pipes, would be {_format_peak(payload.get('theoretical_gflops'))}). "
            "FLOPs counted from the step's XLA HLO (vicreg-tf) and with torch FlopCounterMode (PyTorch): "
            "convolutions and matmuls only, forward + backward.\n"]
    rows = []
    for network, r in payload["networks"].items():
        for variant, v in r["variants"].items():
            if not v.get("step_s"):
                continue
            gflops = v["gflop"] / v["step_s"]
            rows.append([network, LABELS.get(variant, variant), f"{v['gflop']:.1f}", f"{1000 * v['step_s']:.0f}",
                         f"{gflops:.1f}", f"{100 * gflops / peak:.0f}%"])
    header = ["network", "implementation", "GFLOP / step", "step ms", "achieved GFLOP/s", "of matmul peak"]
    text.append(md_table(header, rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--networks", default="small_cnn,resnet18_cifar")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--expander", default="2048-2048-2048")
    parser.add_argument("--matmul", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    args = parser.parse_args(argv)
    if args.child:
        _child_main(json.loads(args.child))
        return 0
    peer = Path(args.peer_python)
    has_peer = peer.exists()
    if not has_peer:
        print(f"note: {peer} missing, PyTorch rows skipped (see bench/requirements-peer.txt)")
    throughput = {}
    if (RESULTS / "throughput.json").exists():
        throughput = json.loads((RESULTS / "throughput.json").read_text())
    payload = {"machine": machine(), "matmul_n": args.matmul, "reps": args.reps, "matmul": {"tf": [], "torch": []},
               "networks": {}, "command": "python -m bench.flops " + " ".join(argv)}
    for _ in range(args.reps):
        for library in ("tf", "torch") if has_peer else ("tf",):
            payload["matmul"][library].append(_ask(library, {"what": "matmul", "n": args.matmul}, peer)["gflops"])
    payload["matmul_peak_gflops"] = max(statistics.median(v) for v in payload["matmul"].values() if v)
    payload["theoretical_gflops"] = _theoretical_peak()
    print(f"matmul GFLOP/s: {payload['matmul']}", flush=True)
    for network in [n for n in args.networks.split(",") if n]:
        measured = throughput.get("results", {}).get(network, {})
        same = throughput.get("batch") == args.batch and throughput.get("expander") == args.expander
        task = {"what": "step", "network": network, "batch": args.batch, "expander": args.expander,
                "time_steps": 0 if (same and measured) else 3}
        tf_count = _ask("tf", task, peer)
        variants = {}
        for v in ("tf", "tf_xla", "tf_bf16"):
            step_ms = measured.get(v, {}).get("step_ms_median") if same else None
            variants[v] = {"gflop": tf_count["total"] / 1e9, "step_s": step_ms / 1000 if step_ms else None}
        if not (same and measured):
            variants["tf_xla"]["step_s"] = tf_count.get("step_s")
        if has_peer:
            torch_count = _ask("torch", task, peer)
            for v, flops in torch_count.items():
                step_ms = measured.get(v, {}).get("step_ms_median") if same else None
                variants[v] = {"gflop": flops / 1e9, "step_s": step_ms / 1000 if step_ms else None}
        payload["networks"][network] = {"hlo_flops": tf_count, "variants": variants}
        print(f"{network}: {json.dumps(variants)}", flush=True)
        write_results("flops", payload, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
