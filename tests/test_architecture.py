"""The shape of the package, checked from its own source: imports flow one way (config -> plan ->
training -> store -> laws -> report -> cli), no module imports itself back through others, and the
stages that only read stored numbers (config, laws, report, fit, report) never load torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lower layers never import higher ones; parts in one layer do not import each other
LAYERS = [
    ["forgetscale", "forgetscale.errors"],
    ["forgetscale.registry", "forgetscale.hub", "forgetscale.host_memory", "forgetscale.formatting"],
    ["forgetscale.config"],  # every key and spec: pydantic only
    ["forgetscale.plan", "forgetscale.store", "forgetscale.data", "forgetscale.models", "forgetscale.artefacts"],
    ["forgetscale.output_head"],  # the head a few rows at a time (training loss, measuring logits)
    ["forgetscale.forgetting", "forgetscale.methods", "forgetscale.laws", "forgetscale.compatibility"],
    ["forgetscale.train", "forgetscale.measure", "forgetscale.references"],  # the loop; measuring models trained elsewhere; bounded base references
    ["forgetscale.mitigations", "forgetscale.integrations"],  # the arms' torch halves; the Trainer callback
    ["forgetscale.executors", "forgetscale.evals"],
    ["forgetscale.sweep", "forgetscale.tracking"],  # the whole pipeline; the store mirrored into MLflow
    ["forgetscale.report"],  # presentation of stored numbers
    ["forgetscale.cli"],
    ["forgetscale.__main__"],
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "forgetscale").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """module -> forgetscale modules it imports (top-level and inside functions; those under TYPE_CHECKING
    only with type_checking=True)."""
    mods = modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, name: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if not type_checking and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in child.names]
                for target in targets:
                    if target.startswith("forgetscale") and resolve(target) not in ("", name):
                        graph[name].add(resolve(target))
                visit(child)

        visit(ast.parse(path.read_text(encoding="utf-8")))
    return graph


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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

    for v in list(graph):
        if v not in index:
            connect(v)
    return found


def test_every_part_has_a_layer():
    assert {part(m) for m in modules()} <= set(LAYER), "add the new part to LAYERS"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_cycles_even_through_type_checking_imports():
    """A circle kept only for type hints is still a circle: neither side can be read without the other."""
    assert cycles(import_graph(type_checking=True)) == []


def test_imports_only_point_down():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if part(a) != part(b) and LAYER[part(b)] >= LAYER[part(a)])
    assert upward == []


def test_the_checks_catch_a_planted_cycle_and_upward_arrow():
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["forgetscale.store"].add("forgetscale.report")  # store -> report -> ... -> store
    assert cycles(graph)
    assert LAYER[part("forgetscale.report")] >= LAYER[part("forgetscale.store")]


BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("transformers", "peft"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def test_config_laws_and_report_import_without_torch(tmp_path):
    done = _python("import forgetscale.config, forgetscale.plan, forgetscale.laws, forgetscale.report\n"
                   "import forgetscale.methods, forgetscale.mitigations\n"
                   "forgetscale.config.parse_config({'method': ['lora', 'ia3'], 'mitigation': ['kl', 'scale']})\n"
                   "print('ok')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _write_store(run_dir: Path) -> None:
    """Rows that follow the paper's line L_f = -c L_ft + s, for fit and report to read (no training)."""
    from forgetscale.store import Store

    with Store(run_dir) as store:
        store.set_meta("sweep_config", json.dumps({"name": "synthetic"}))
        for rank in (4, 16, 64):
            run_id = f"r{rank}"
            store.add_run({"run_id": run_id, "model": "m", "dataset": "d", "method": "lora",
                           "method_config": {"name": "lora"}, "rank": rank, "trainable_params": 10_000 * rank,
                           "seed": 0, "config": {"method": {"name": "lora"}, "rank": rank}, "status": "finished"})
            for step in (0, 10, 20, 40, 80, 160):
                ft = 2.0 + 1.5 * (1 + step / 10) ** -0.4 * (1 - 0.05 * rank ** 0.25)
                kl = 0.0 if step == 0 else 0.8 * (3.5 - ft) + 0.01 * ((rank + step) % 3)
                store.add_checkpoint({"run_id": run_id, "step": step, "ft_loss": ft, "ft_loss_train": ft,
                                      "forget_ce": 3.0 + kl, "forget_ce_hard": 3.5 + kl, "base_entropy": 3.0,
                                      "forget_kl": kl, "ft_kl": kl, "tokens_seen": 256 * step, "wall_s": step})


@pytest.mark.parametrize("verb", ["fit", "report"])
def test_fit_and_report_run_without_torch(tmp_path, verb):
    run_dir = tmp_path / "run"
    _write_store(run_dir)
    done = _python(f"import sys\nfrom forgetscale.cli import main\nsys.exit(main([{verb!r}, {str(run_dir)!r}]))",
                   tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / ("laws.json" if verb == "fit" else "report.html")).is_file()
