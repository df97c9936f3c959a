"""The docs a user reaches: README links only to files in this repository (or to the web),
every such link resolves, and docs/benchmarks.md names every benchmark provider."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_links_stay_in_the_repository_and_resolve():
    assert len(PAGES) >= 4
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if re.match(r"https?://", target):
                continue
            assert (page.parent / target).resolve().is_relative_to(ROOT), f"{page.name}: {target} leaves the repo"
            assert (page.parent / target).exists(), f"{page.name}: link {target} does not exist"
        for path in re.findall(r"`((?:benches|docs|trp|trp_kernels|csrc|tests)/[\w./-]+)`", text):
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_benchmark_docs_name_every_provider():
    from trp.benchmark.providers import LAYER_PROVIDERS, MODEL_PROVIDERS, PROVIDER_HELP

    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in (*LAYER_PROVIDERS, *MODEL_PROVIDERS):
        assert f"| `{name}` | {PROVIDER_HELP[name]} |" in text, name
