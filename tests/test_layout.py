"""The layout: no import cycles, docs/ARCHITECTURE.md names files that exist, a wheel with only vicreg_tf."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("vicreg_tf", "trainers", "export", "configs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every module of ours that `name` imports, at any depth of its code (function-level too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
            # `from pkg import name`: an edge to pkg.name if that is a module, else to pkg
            targets = [t for t in targets if t in modules] or [source]
            if len(targets) > 1 and source in targets:
                targets.remove(source)
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_package_the_trainers_or_the_export_tools():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ may import its own modules (re-exports); a module importing its
    # package's __init__ back is what makes a cycle, and is caught.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[name].name == "__init__.py" and t.startswith(name + "."))}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_file_the_architecture_page_names_exists():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:vicreg_tf|trainers|export|configs|bench|tests|docs|examples)/[\w/.]*\w)`", text))
    assert len(named) >= 20
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == []


def _registries() -> dict:
    """config key -> its name -> builder dict (the only place a value of the key is looked up)."""
    from trainers import build
    from vicreg_tf import augment, backbones, methods

    return {"data.source": build.SOURCES, "views.preset": augment.PRESETS, "model.method": methods.METHODS,
            "model.backbone": backbones.BACKBONES, "optimizer.name": build.OPTIMIZERS}


def test_sources_presets_methods_backbones_optimizers_are_dicts_of_builders_the_configs_name():
    import importlib

    registries = _registries()
    for key, registry in registries.items():
        assert isinstance(registry, dict) and registry, key
        assert all(isinstance(name, str) and callable(build) for name, build in registry.items()), key
    for path in sorted((REPO / "configs").glob("*.py")):
        if path.stem == "__init__":
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        for key, registry in registries.items():
            section, field = key.split(".")
            assert config[section][field] in registry, (path.stem, key, config[section][field])
    # "Where to add" names each registry, so a new source or preset is its module, its entry and a config.
    where_to_add = (REPO / "docs" / "ARCHITECTURE.md").read_text().split("## Where to add", 1)[1]
    for name in ("SOURCES", "PRESETS", "METHODS", "BACKBONES", "OPTIMIZERS"):
        assert f"`{name}`" in where_to_add, name


def test_trainers_look_names_up_in_the_registries_and_nowhere_else():
    # No if/elif over the names beside a registry: build.py compares no config value with a registered name.
    text = (REPO / "trainers" / "build.py").read_text()
    for key, registry in _registries().items():
        for name in registry:
            assert f'== "{name}"' not in text and f"== '{name}'" not in text, (key, name)


def test_onednn_default_is_decided_in_one_place():
    setters = []
    for folder in ("vicreg_tf", "trainers", "export", "configs", "bench", "tests", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            if "TF_ENABLE_ONEDNN_OPTS" in path.read_text() and "setdefault" in path.read_text():
                if re.search(r'setdefault\(\s*"TF_ENABLE_ONEDNN_OPTS"', path.read_text()):
                    setters.append(str(path.relative_to(REPO)))
    assert setters == ["vicreg_tf/__init__.py"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("vicreg_tf-*.whl")
    return path


def test_the_wheel_installs_only_vicreg_tf(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"vicreg_tf", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for expected in ("vicreg_tf/trainers/pretrain.py", "vicreg_tf/configs/fashion_mnist.py",
                     "vicreg_tf/configs/tiny.py", "vicreg_tf/export/export.py", "vicreg_tf/data/folders.py"):
        assert expected in names
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vicreg-train = vicreg_tf.trainers.pretrain:main" in entry_points
    assert "vicreg-launch-local = vicreg_tf.trainers.launch_local:main" in entry_points


@pytest.mark.large
def test_a_non_editable_install_trains_and_exports_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    # Without pip of its own (ensurepip takes seconds): this environment's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies (TensorFlow, Keras, ...) come from this test's environment, as a plain
    # path entry: its .pth files (the editable install of this checkout) are not run.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Where `import vicreg_tf` loads from, found without running it (vicreg-train below imports it).
    find = "import importlib.util; print(importlib.util.find_spec('vicreg_tf').origin)"
    where = subprocess.run([str(python), "-c", find], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(str(site)), where.stdout
    workdir = tmp_path / "run"
    train = subprocess.run([str(venv / "bin" / "vicreg-train"), "--config=tiny", f"--workdir={workdir}",
                            "--config.eval.knn_every=0", "--config.eval.knn_max_eval=256", "--config.training.epochs=1",
                            "--config.training.steps_per_epoch=2"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (workdir / "backbone.keras").exists()
    export = subprocess.run([str(venv / "bin" / "vicreg-export"), f"--backbone={workdir / 'backbone.keras'}",
                             f"--base={tmp_path / 'models'}", "--name=tiny"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "models" / "tiny" / "1" / "saved_model.pb").exists()


def _make_dry_run(target: str, tmp_path) -> str:
    """The commands `make TARGET` would run for a fresh virtualenv (make -n runs none of them)."""
    result = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_demo_installs_no_pytorch_and_make_test_the_pinned_cpu_build(tmp_path):
    import configparser

    demo = _make_dry_run("demo", tmp_path)
    assert "pip install" in demo and "vicreg-train" in demo
    assert "torch" not in demo and "[test" not in demo
    test = _make_dry_run("test", tmp_path)
    assert 'pip install -q "torch==2.13.0"' in test and ".[test" in test and "pytest" in test
    # No extra that make installs brings an unpinned torch with it.
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = setup["options.extras_require"]
    for extra in ("serving", "test"):
        assert "torch" not in extras[extra], extra
    assert "torch" not in setup["options"]["install_requires"]
    assert "torch" in extras["torch"]  # users who import checkpoints: pip install "vicreg-tf[torch]"


def test_programs_run_as_modules_of_the_installed_package_load_tensorflow_lazily(tmp_path):
    # `python -m vicreg_tf.trainers.X`: vicreg_tf loads while sys.argv[0] is still "-m".
    for module in ("vicreg_tf.trainers.launch_local", "vicreg_tf.trainers.pretrain"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120, env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
        assert result.returncode == 0, result.stderr[-2000:]
        imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "vicreg_tf.trainers" in imported and "tensorflow" not in imported, module


def test_a_method_is_its_class_and_one_registry_entry():
    """docs/ARCHITECTURE.md 'Where to add': nothing outside vicreg_tf/methods.py (and a config) names a method."""
    import re

    from vicreg_tf.base import BaseMethod
    from vicreg_tf.methods import METHODS

    build = (REPO / "trainers" / "build.py").read_text()
    for name in METHODS:
        assert not re.search(rf"[\"']{name}[\"']", build), f"trainers/build.py names the method {name!r}"
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert "compute_terms" in text and "METHODS" in text
    import importlib

    config = importlib.import_module("configs.tiny").get_config()
    from trainers import build as build_module

    for name in METHODS:
        config.model.method = name
        assert isinstance(build_module.make_model(config, total_steps=2), BaseMethod), name


def test_programs_benchmarks_and_examples_import_vicreg_tf_before_tensorflow():
    """vicreg_tf decides TensorFlow's oneDNN default when it is imported first; isort would sort it last."""
    import ast

    files = [REPO / "tests" / "conftest.py", *(REPO / "bench").glob("*.py"), *(REPO / "examples").glob("*.py"),
             *(REPO / "export").glob("*.py"), REPO / "trainers" / "cli.py"]
    late = []
    for path in files:
        tree = ast.parse(path.read_text())
        # Where a process starts importing: module level, the programs' quiet start-up blocks, the entry
        # points of benchmark processes.
        entries = [n for n in ast.walk(tree) if isinstance(n, ast.With)
                   or (isinstance(n, ast.FunctionDef) and (n.name == "main" or n.name.startswith("_tf_")))]
        module_first = None
        for block in [tree, *entries]:
            if block is not tree and module_first == "vicreg_tf":
                break  # imported first at module level: the process has it before anything else
            first = None
            for node in getattr(block, "body", []):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                heavy = [n.split(".")[0] for n in names if n.split(".")[0] in ("tensorflow", "keras", "vicreg_tf")]
                if heavy and first is None:
                    first = heavy[0]
                if first not in (None, "vicreg_tf") and "vicreg_tf" in heavy:
                    late.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if block is tree:
                module_first = first
    assert not late, f"vicreg_tf imported after TensorFlow or Keras in: {late}"
