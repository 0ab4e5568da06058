"""mkdocs hooks: regenerate the config reference before every build, and make the README the
manual's home page (one source: docs/index.md only marks the place)."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_pre_build(config, **kwargs):
    runpy.run_path(str(ROOT / "scripts" / "config_reference.py"), run_name="__main__")


def readme_as_home(readme: str) -> str:
    """The README with its links made relative to docs/: `docs/x.md` -> `x.md`, and the
    changelog to the manual's own page."""
    text = re.sub(r"\]\(docs/", "](", readme)
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri == "index.md":
        return readme_as_home((ROOT / "README.md").read_text(encoding="utf-8"))
    return markdown
