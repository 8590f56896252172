"""A second corpus that every machine has: English prose from this interpreter's standard library.

    python benchmarks/prose_corpus.py --out /tmp/prose.jsonl.gz
    python benchmarks/sweep_engram.py --set data.source=/tmp/prose.jsonl.gz --record benchmarks/runs/ablations_prose

The default corpus ("stdlib") is the standard library's code. This one is its prose: the
docstrings of every module, class and function (one record per module, cleaned by
`ast.get_docstring`, in sorted path order, test folders and site-packages left out, as
in the default corpus) and the reference manual's topics that `help()` shows
(`pydoc_data.topics`, one record each). About 2.3 MB on CPython 3.11. Written as gzipped
JSONL with a "text" field: the README's own-data path reads it as it is
(`--set data.source=FILE`), split by record.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import pathlib
import sysconfig

_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test"}


def module_docstrings(path: pathlib.Path) -> str:
    """The docstrings of a module and of its classes and functions, blank-line separated."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return "\n\n".join(doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node)))


def records() -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [module_docstrings(p) for p in sorted(root.rglob("*.py"))
             if not _SKIP_PARTS.intersection(p.relative_to(root).parts)]
    from pydoc_data.topics import topics

    texts += [topics[name] for name in sorted(topics)]
    return [t for t in texts if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the .jsonl.gz file to write")
    args = parser.parse_args()
    texts = records()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same interpreter writes the same bytes, so the token store is reused.
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        for text in texts:
            f.write((json.dumps({"text": text}) + "\n").encode())
    print(json.dumps({"records": len(texts), "chars": sum(map(len, texts)), "out": str(args.out)}))


if __name__ == "__main__":
    main()
