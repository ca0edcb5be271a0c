"""The library/toolkit boundary: ``import curvreg`` needs torch only, and the command line says
which extra to install when the toolkit's are missing."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = '''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # as if only torch were installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numpy", "yaml", "tqdm", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
'''


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_library_works_without_the_toolkits_dependencies():
    r = run("import torch, curvreg\n"
            "obj = curvreg.penalized_objective(torch.nn.Linear(3, 2), torch.randn(4, 3),\n"
            "                                  torch.tensor([0, 1, 0, 1]), 0.1)\n"
            "obj.value.backward()\n"
            "ref = curvreg.reference.loop_sq_grad_norms  # as the README writes it\n"
            "print('ok', tuple(obj.sq_norms.shape), 'numpy' in sys.modules,\n"
            "      any(m.startswith('curvreg.lab') for m in sys.modules))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-4:] == ["ok", "(4,)", "False", "False"]


def test_the_command_line_names_the_missing_extra():
    for entry in ("from curvreg.lab.entry import main; sys.exit(main(['train', '--help']))",
                  "import runpy; sys.argv = ['curvreg', 'train']; runpy.run_module('curvreg', run_name='__main__')"):
        r = run(entry)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == ("curvreg: the command line needs the toolkit's extras (numpy is "
                                    "missing); install them with: pip install -e '.[lab]'")


def test_no_library_module_imports_the_toolkit():
    offenders = []
    for path in (ROOT / "curvreg").rglob("*.py"):
        rel = path.relative_to(ROOT / "curvreg")
        if rel.parts[0] == "lab" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            level = getattr(node, "level", 0)
            if any(n.startswith("curvreg.lab") or (level and n.startswith("lab")) for n in names):
                offenders.append(str(rel))
    assert not offenders
