"""The house as docs/architecture.md describes it: the kernel imports no plugin and no application, no module
imports another in a cycle (top-level imports), and the module map names every module of the tree."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = ("interfaces", "hookspecs", "registry", "config", "plugins", "io", "audio", "mel", "checks", "pretrained",
          "optional")
APPLICATIONS = ("pipeline", "loading", "conditioning", "training", "experiment", "database", "evaluation", "longtail",
                "cli", "distributed", "diffusers_folder", "testing", "plots", "modes", "longclip")


def module_imports() -> dict[str, set[str]]:
    """reaudio_core module -> the reaudio_core / reaudio_plugins modules its top-level code imports."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "reaudio_core").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found |= {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {t for t in found if t != name and (t in files or t.startswith("reaudio_plugins"))}
    return graph


def test_the_kernel_imports_no_plugin_and_no_application():
    graph = module_imports()
    for name in KERNEL:
        bad = {t for t in graph[f"reaudio_core.{name}"]
               if t.startswith("reaudio_plugins") or t.split(".")[1] in APPLICATIONS}
        assert not bad, f"kernel module {name} imports {sorted(bad)}"


def test_no_import_cycles():
    graph, state, cycles = module_imports(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_module_map_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for folder in ("reaudio_core", "plugins", "research", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            rel = path.relative_to(REPO).as_posix()
            if rel not in text and path.name not in text:
                missing.append(rel)
    assert not missing, f"docs/architecture.md does not name {missing}"
