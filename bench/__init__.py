"""vicreg-tf benchmarks: `python -m bench` runs them all, `python -m bench.NAME` one (docs/BENCHMARKS.md).

Every benchmark sees TensorFlow as a vicreg-tf user does: it imports `vicreg_tf` before
TensorFlow, and `vicreg_tf/__init__.py` decides TensorFlow's oneDNN default (the one place
that does).
"""


def cpu_flags() -> str:
    """"<model>; flags: <AVX-512 and AMX flags>" of this machine's CPU, for every figure a benchmark writes."""
    import platform
    import re
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))
    return f"{model.group(1).strip() if model else platform.processor()}; flags: {' '.join(flags) or 'no AVX-512/AMX'}"
