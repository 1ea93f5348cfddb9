"""MkDocs hooks: the site's home page is the README (one text, no copy to keep in step)."""

from __future__ import annotations

import re
from pathlib import Path


def on_page_markdown(markdown: str, page, config, files) -> str:
    """``index.md`` is replaced by ``README.md`` with its ``docs/`` links made site-relative."""
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    return re.sub(r"\]\(docs/", "](", readme.read_text(encoding="utf-8"))
