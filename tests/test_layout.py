"""Architecture rules that code review alone would let slip."""

import ast
from pathlib import Path

import univ_kernels

ALLOWED = {"torch", "triton", "numpy", "safetensors", "univ_kernels", "__future__"}


def test_univ_kernels_imports_only_torch_triton_numpy_safetensors():
    """Other pipelines embed univ_kernels: it must never import univ (or anything heavy)."""
    root = Path(univ_kernels.__file__).parent
    stdlib_ok = {"os", "json", "tempfile", "pathlib", "dataclasses", "typing", "math", "collections", "contextlib",
                 "errno", "hashlib", "shutil", "struct"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED | stdlib_ok, f"{path.name} imports {name}"


def test_stage_computations_do_not_import_the_analyze_stage():
    """analyze builds on stats and families; they must not import it back (their CLIs live in univ/commands)."""
    root = Path(univ_kernels.__file__).parent.parent / "univ"
    for name in ("stats.py", "families.py", "vocab_features.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("univ.analyze"), f"univ/{name} imports {node.module}"
