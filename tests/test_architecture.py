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

# lower layers never import higher ones; parts in one layer do not import each other. A part is a package or module
# (`forgetscale.evals`), or a module listed on its own (`forgetscale.evals.runner`), which then is not in its package's.
LAYERS = [
    ["forgetscale", "forgetscale.errors"],
    ["forgetscale.registry", "forgetscale.hub", "forgetscale.host_memory", "forgetscale.schema",
     "forgetscale.formatting"],
    ["forgetscale.methods"],  # one module per method: its spec and its attach function, one registration
    ["forgetscale.mitigations", "forgetscale.evals"],  # one module per arm / suite: its spec and its torch half
    ["forgetscale.config"],  # every key and spec: pydantic only
    ["forgetscale.runs", "forgetscale.store", "forgetscale.data", "forgetscale.models", "forgetscale.artefacts",
     "forgetscale.compiled"],
    ["forgetscale.metric", "forgetscale.laws", "forgetscale.compatibility"],  # the metric in one package
    ["forgetscale.weights"],  # tuned weights from elsewhere: found, checked and put on the base
    # the loop; the `measure` verb's work; the arms' once-per-sweep inputs
    ["forgetscale.train", "forgetscale.measure", "forgetscale.mitigations.inputs"],
    # what the executor asks of the arms; the Trainer callback; what the suites generate and read; the guard's gate
    ["forgetscale.mitigations.runtime", "forgetscale.integrations", "forgetscale.evals.generation",
     "forgetscale.evals.items", "forgetscale.evals.labels", "forgetscale.refusal_gate"],
    ["forgetscale.executors", "forgetscale.evals.runner", "forgetscale.guarded"],  # guarded: a model built by training
    ["forgetscale.sweep", "forgetscale.tracking"],  # the whole pipeline; the store mirrored into MLflow
    ["forgetscale.report"],  # presentation of stored numbers
    ["forgetscale.cli"],
    ["forgetscale.__main__"],
]
# A registration module sits below config (config validates with its spec) but its torch half runs at training or
# eval time: the imports inside its functions (deferred: they run when called, not when the module is imported)
# obey the layer of the module that runs the registered halves instead.
RUNS_WITH = {"forgetscale.mitigations": "forgetscale.mitigations.runtime", "forgetscale.evals": "forgetscale.evals.runner"}
# A model name built on first use (models.resolve_source -> guarded.build): models resolves every name, the builder
# trains, generates and measures at its own layer; this one deferred import up is the only way in.
BUILT_ON_FIRST_USE = {("forgetscale.models", "forgetscale.guarded")}
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "forgetscale").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_edges(type_checking: bool = False) -> dict[tuple[str, str], bool]:
    """(module, forgetscale module it imports) -> deferred: True when every such import is inside a function (those
    under TYPE_CHECKING, which never run, only with type_checking=True)."""
    mods = modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[tuple[str, str], bool] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, deferred: bool, name: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                hints = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
                if hints and not type_checking:
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
                        key = (name, resolve(target))
                        edges[key] = edges.get(key, True) and deferred
                # type hints never run at import time: deferred, like the imports inside functions
                visit(child, deferred or hints or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """module -> forgetscale modules it imports (top-level and inside functions; those under TYPE_CHECKING only
    with type_checking=True)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in import_edges(type_checking):
        graph[a].add(b)
    return graph


def part(module: str) -> str:
    """The longest prefix of `module` listed in LAYERS (a package's modules belong to the package's part)."""
    names = module.split(".")
    for n in range(len(names), 2, -1):
        if ".".join(names[:n]) in LAYER:
            return ".".join(names[:n])
    return ".".join(names[:2])


def limit(module: str, deferred: bool) -> int:
    """The layer an import in `module` must point below: its part's, or, deferred in a registration part, the
    layer of the module that runs it."""
    home = part(module)
    return LAYER[RUNS_WITH[home]] if deferred and home in RUNS_WITH else LAYER[home]


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


def checked_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """The import graph without a registration's deferred imports up to the layer that runs it (config -> arm
    module -> train -> config): those run after every module is imported, by design."""
    graph: dict[str, set[str]] = defaultdict(set)
    for (a, b), deferred in import_edges(type_checking).items():
        sanctioned = deferred and ((a, b) in BUILT_ON_FIRST_USE
                                   or (part(a) in RUNS_WITH and LAYER[part(b)] >= LAYER[part(a)]))
        if not sanctioned:
            graph[a].add(b)
    return graph


def test_no_import_cycles():
    assert cycles(checked_graph()) == []


def test_no_import_cycles_even_through_type_checking_imports():
    """A circle kept only for type hints is still a circle: neither side can be read without the other."""
    assert cycles(checked_graph(type_checking=True)) == []


def test_imports_only_point_down():
    upward = sorted(f"{a} -> {b}" for (a, b), deferred in import_edges().items()
                    if part(a) != part(b) and LAYER[part(b)] >= limit(a, deferred)
                    and not (deferred and (a, b) in BUILT_ON_FIRST_USE))
    assert upward == []


def test_a_registration_imports_upward_only_inside_its_functions():
    """The same import at module level would load train (and torch) whenever config validates an arm."""
    edges = import_edges()
    assert edges[("forgetscale.mitigations.scale", "forgetscale.train")] is True
    assert limit("forgetscale.mitigations.scale", False) <= LAYER[part("forgetscale.train")]
    assert limit("forgetscale.mitigations.scale", True) > LAYER[part("forgetscale.train")]


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
    """Also every module of the method, arm and suite registrations: config imports them to validate."""
    registrations = sorted(m for m in modules() if part(m) in ("forgetscale.methods", "forgetscale.mitigations",
                                                                "forgetscale.evals"))
    assert "forgetscale.methods.lora" in registrations and "forgetscale.mitigations.kl" in registrations
    assert "forgetscale.evals.choice" in registrations and "forgetscale.evals.runner" not in registrations
    done = _python("import importlib\n"
                   "import forgetscale.config, forgetscale.runs, forgetscale.laws, forgetscale.report\n"
                   f"for m in {registrations!r}: importlib.import_module(m)\n"
                   "from forgetscale.methods import METHODS\n"
                   "from forgetscale.mitigations import MITIGATIONS\n"
                   "from forgetscale.evals import suite_names\n"
                   "forgetscale.config.parse_config({'method': ['lora', 'ia3'], 'mitigation': ['kl', 'scale']})\n"
                   "forgetscale.config.parse_config({'method': METHODS.names()})\n"
                   "forgetscale.config.parse_config({'mitigation': MITIGATIONS.names(),\n"
                   "                                 'evals': {'suites': [*suite_names(), 'lm-eval:arc_easy']}})\n"
                   "print('ok')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _write_store(run_dir: Path) -> None:
    """Rows that follow the paper's line L_f = -c L_ft + s, for fit and report to read (no training)."""
    from forgetscale.store import CheckpointRow, RunRecord, Store

    with Store(run_dir) as store:
        store.set_meta("sweep_config", json.dumps({"name": "synthetic"}))
        for rank in (4, 16, 64):
            run_id = f"r{rank}"
            store.add_run(RunRecord(run_id=run_id, model="m", dataset="d", method="lora",
                                    method_config={"name": "lora"}, rank=rank, trainable_params=10_000 * rank,
                                    seed=0, config={"method": {"name": "lora"}, "rank": rank}, status="finished"))
            for step in (0, 10, 20, 40, 80, 160):
                ft = 2.0 + 1.5 * (1 + step / 10) ** -0.4 * (1 - 0.05 * rank ** 0.25)
                kl = 0.0 if step == 0 else 0.8 * (3.5 - ft) + 0.01 * ((rank + step) % 3)
                store.add_checkpoint(CheckpointRow(run_id=run_id, step=step, ft_loss=ft, ft_loss_train=ft,
                                                   forget_ce=3.0 + kl, forget_ce_hard=3.5 + kl, base_entropy=3.0,
                                                   forget_kl=kl, ft_kl=kl, tokens_seen=256 * step, wall_s=step))


@pytest.mark.parametrize("verb", ["fit", "report"])
def test_fit_and_report_run_without_torch(tmp_path, verb):
    run_dir = tmp_path / "run"
    _write_store(run_dir)
    done = _python(f"import sys\nfrom forgetscale.cli import main\nsys.exit(main([{verb!r}, {str(run_dir)!r}]))",
                   tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / ("laws.json" if verb == "fit" else "report.html")).is_file()


METRIC_NAMES = {"score", "batches", "forward", "expected_log_q", "base_distribution", "Rows", "Reference",
                "MemoryReference", "memory_reference", "DiskReference", "RecomputeReference", "TopKReference",
                "choose", "ForgettingMeter", "ForgettingResult", "block_interval", "block_se", "LogitsWorkspace",
                "next_token_loss"}


def test_the_metric_lives_in_one_package():
    """The central number is computed in forgetscale/metric/ alone: its sums, where the base predictions live,
    the output head and the notebook API; nothing outside defines one of its parts again."""
    mods = modules()
    metric = {name for name in mods if name == "forgetscale.metric" or name.startswith("forgetscale.metric.")}
    assert metric == {"forgetscale.metric", *(f"forgetscale.metric.{m}" for m in ("head", "sums", "references", "meter", "shard"))}
    for gone in ("forgetting", "references", "output_head"):
        assert f"forgetscale.{gone}" not in mods, f"forgetscale.{gone} is back outside forgetscale/metric/"
    elsewhere = {}
    for name, path in mods.items():
        if name in metric:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level (Law.score is the estimator's)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in METRIC_NAMES:
                elsewhere[f"{name}.{node.name}"] = node.lineno
    assert not elsewhere, f"parts of the metric defined outside forgetscale/metric/: {elsewhere}"
