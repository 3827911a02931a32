#!/usr/bin/env bash
# Checks every relative link of the repository's Markdown files: the file it
# names must exist and, for an anchor (`docs/foo.md#bar`, `#section`), the
# target Markdown file must have a heading with that anchor under GitHub's slug
# rules (lowercase; punctuation other than `-` and `_` removed; spaces become
# `-`; a repeated heading gets `-1`, `-2`, ...). External links (http:, https:,
# mailto:, any other scheme) are not fetched.
#
# Files: README.md, CONTRACT.md, BENCHMARKS.md, docs/*.md and every other *.md
# of the tree outside target/, .venv/ and .git/; or only the files given as
# arguments (paths relative to the repository root or absolute).
#
# Prints each broken link as `file:line: link: why` and exits 1 if there is
# any; exits 0 with a one-line summary otherwise. Needs only bash and python3
# (standard library), no network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v python3 >/dev/null 2>&1 || {
    printf 'error: python3 is needed to check the links\n' >&2
    exit 1
}

exec python3 - "$ROOT" "$@" <<'PY'
import os
import re
import sys
import unicodedata
from urllib.parse import unquote

root = os.path.realpath(sys.argv[1])
SKIP_DIRS = {"target", ".venv", ".git"}


def markdown_files():
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.lower().endswith(".md"):
                found.append(os.path.join(dirpath, name))
    return found


def rel(path):
    return os.path.relpath(path, root)


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def lines_outside_code(text):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and line.strip() == m.group(1):
            fence = None


def strip_code_spans(line):
    """The line with inline code spans blanked out (same length)."""
    out = []
    i = 0
    while i < len(line):
        if line[i] == "`":
            j = i
            while j < len(line) and line[j] == "`":
                j += 1
            ticks = line[i:j]
            end = line.find(ticks, j)
            while end != -1 and end + len(ticks) < len(line) and line[end + len(ticks)] == "`":
                end = line.find(ticks, end + len(ticks) + 1)
            if end == -1:
                out.append(line[i:j])
                i = j
                continue
            out.append(" " * (end + len(ticks) - i))
            i = end + len(ticks)
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = heading.strip()
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links, images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = re.sub(r"(\*+)(.+?)\1", r"\2", text)  # *emphasis*, **strong**
    text = text.lower()
    text = "".join(
        c for c in text
        if c in "-_ " or unicodedata.category(c)[0] in "LNM"
    )
    return text.replace(" ", "-")


ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ID = re.compile(r"""<a\s[^>]*?(?:name|id)\s*=\s*["']([^"']+)["']""", re.I)

_anchors = {}


def anchors_of(path):
    """Every anchor a Markdown file offers: heading slugs and HTML ids."""
    if path in _anchors:
        return _anchors[path]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = set()
    seen = {}
    previous = None  # the previous non-blank line outside code, for setext headings

    def add_heading(title):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")

    for _, line in lines_outside_code(text):
        for m in HTML_ID.finditer(line):
            found.add(m.group(1))
        m = ATX.match(line)
        if m:
            add_heading(m.group(2) or "")
            previous = None
            continue
        if SETEXT.match(line) and previous is not None and not previous.lstrip().startswith("|"):
            add_heading(previous)
            previous = None
            continue
        previous = line if line.strip() and not line.startswith("    ") else None
    _anchors[path] = found
    return found


# [text](dest) and ![alt](dest); dest may sit in <...> and carry a "title".
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
# [label]: dest
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_link(source, dest):
    """None if `dest`, written in `source`, resolves; else why not."""
    if dest.startswith("<") and dest.endswith(">"):
        dest = dest[1:-1]
    if not dest or SCHEME.match(dest) or dest.startswith("//"):
        return None  # external: not fetched
    path_part, _, anchor = dest.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part:
        if path_part.startswith("/"):
            target = os.path.join(root, path_part.lstrip("/"))
        else:
            target = os.path.join(os.path.dirname(source), path_part)
        target = os.path.normpath(target)
        if not os.path.exists(target):
            return f"no such file {rel(target)}"
    else:
        target = source
    if not anchor:
        return None
    if not target.lower().endswith(".md") or os.path.isdir(target):
        return None  # anchors are checked in Markdown files only
    anchor = unquote(anchor)
    if anchor not in anchors_of(target):
        return f"no heading with anchor #{anchor} in {rel(target)}"
    return None


def main():
    if len(sys.argv) > 2:
        files = [os.path.realpath(p if os.path.isabs(p) else os.path.join(root, p))
                 for p in sys.argv[2:]]
    else:
        files = markdown_files()
    broken = 0
    checked = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            print(f"{rel(path)}:0: -: cannot read ({e.strerror})")
            broken += 1
            continue
        for number, line in lines_outside_code(text):
            line = strip_code_spans(line)
            dests = [m.group(1) for m in INLINE.finditer(line)]
            m = DEFINITION.match(line)
            if m:
                dests.append(m.group(1))
            for dest in dests:
                checked += 1
                why = check_link(path, dest)
                if why:
                    broken += 1
                    print(f"{rel(path)}:{number}: {dest}: {why}")
    if broken:
        print(f"{broken} broken link(s) in {len(files)} Markdown file(s)", file=sys.stderr)
        return 1
    print(f"links ok: {checked} link(s) in {len(files)} Markdown file(s)")
    return 0


sys.exit(main())
PY
