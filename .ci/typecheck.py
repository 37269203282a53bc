"""mypy over the whole tree, with server/ and worker/ checked as ranger_ps.server and ranger_ps.worker.

Those two folders install under the ``ranger_ps`` import name through a setuptools package-dir
mapping (pyproject.toml). An editable install resolves that mapping with an import hook, which no
static tool can follow, so this runs mypy's build with every file of the two folders given under
its installed module name; everything else (configuration, the other paths) is mypy's own.

Usage: ``python .ci/typecheck.py [PATHS...]`` (default: ranger_ps tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"server": "ranger_ps.server", "worker": "ranger_ps.worker"}


def _mapped_sources() -> list[BuildSource]:
    sources = []
    for folder, package in MAPPED.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            sources.append(BuildSource(str(path.relative_to(ROOT)), ".".join([package, *parts])))
    return sources


def main(argv: list[str]) -> int:
    paths = argv or ["ranger_ps", "tests"]
    sources, options = process_options(paths)
    sources = [*sources, *_mapped_sources()]
    try:
        result = build.build(sources, options, stdout=sys.stdout, stderr=sys.stderr)
    except CompileError as exc:
        print("\n".join(exc.messages), file=sys.stderr)
        return 2
    for line in result.errors:
        print(line)
    if result.errors:
        files = len({line.split(":", 1)[0] for line in result.errors if ": error:" in line})
        print(f"Found errors in {files} files (checked {len(sources)} source files)")
        return 1
    print(f"Success: no issues found in {len(sources)} source files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
