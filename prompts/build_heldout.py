"""Build prompts/heldout.jsonl: code the demo pair never saw (it was trained on CPython's standard
library only), cut from third-party packages installed in the project's .venv.

    .venv/bin/python prompts/build_heldout.py            # writes prompts/heldout.jsonl

Per package in PACKAGES (pure-Python sources, several licences and styles), one source file drawn
with a fixed seed, and from it two prompts the way prompts/dev.jsonl's are cut: whole lines ending
with a `def` or `class` header, 500 to 1200 characters, so the model continues a body. Each row
records the package, its version and the file. The same .venv gives the same file; another
version of a package may give another prompt, which the row's version shows.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import zlib
from pathlib import Path

PACKAGES = {   # import name -> distribution name
    "click": "click", "jinja2": "jinja2", "attr": "attrs", "anyio": "anyio", "h11": "h11", "idna": "idna",
    "fsspec": "fsspec", "jsonschema": "jsonschema", "dateutil": "python-dateutil", "huggingface_hub": "huggingface_hub",
    "networkx": "networkx", "pygments": "pygments", "rich": "rich", "tomlkit": "tomlkit", "urllib3": "urllib3",
    "pyparsing": "pyparsing",
}
PER_PACKAGE = 2
MIN_CHARS, MAX_CHARS = 500, 1200
SEED = 13


def site_packages() -> Path:
    import click            # any installed third-party package: its parent is site-packages
    return Path(click.__file__).resolve().parents[1]


def headers(lines: list[str]) -> list[int]:
    """Indices of `def`/`class` header lines that end a complete signature."""
    return [i for i, line in enumerate(lines)
            if line.lstrip().startswith(("def ", "class ", "async def ")) and line.rstrip().endswith(":")]


def cut(lines: list[str], end: int) -> str | None:
    """Whole lines ending with lines[end], MIN_CHARS..MAX_CHARS long, or None."""
    text = ""
    for start in range(end, -1, -1):
        candidate = "".join(lines[start:end + 1])
        if len(candidate) > MAX_CHARS:
            break
        text = candidate
    return text if len(text) >= MIN_CHARS else None


def prompts_of(package: str, root: Path, rng: random.Random) -> list[tuple[Path, str]]:
    files = sorted(p for p in (root / package).rglob("*.py") if "test" not in p.as_posix().lower())
    rng.shuffle(files)
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        found = [t for t in (cut(lines, i) for i in headers(lines)) if t]
        if len(found) >= PER_PACKAGE:
            picks = sorted(rng.sample(range(len(found)), PER_PACKAGE))
            return [(path, found[i]) for i in picks]
    raise SystemExit(f"{package}: no file with {PER_PACKAGE} prompts of {MIN_CHARS}-{MAX_CHARS} characters; "
                     f"drop it from PACKAGES or install it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("heldout.jsonl"))
    args = ap.parse_args()
    root = site_packages()
    rows = []
    for package, dist in PACKAGES.items():
        rng = random.Random(SEED * 1_000_003 + zlib.crc32(package.encode()))
        version = importlib.metadata.version(dist)
        for path, text in prompts_of(package, root, rng):
            rows.append({"id": f"heldout-{len(rows):03d}", "source": f"{dist}=={version}/{path.relative_to(root).as_posix()}",
                         "prompt": text})
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts from {len(PACKAGES)} packages to {args.out}")


if __name__ == "__main__":
    main()
