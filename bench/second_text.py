"""The race's second text genre: encyclopedic Wikipedia prose, which no calibration or held-out file
of the project contains (those are State of the Union addresses, Moby-Dick and Q/A records).

    PYTHONPATH=. python bench/second_text.py OUT.txt [--wheel gensim-4.4.0-...whl]

Source: the gensim 4.4.0 wheel from PyPI (`pip download --no-deps gensim==4.4.0`, fetched by this
script when --wheel is not given), member
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`: a
2016 English Wikipedia dump excerpt (MediaWiki 1.27), 206 pages. Licence of the text: CC BY-SA 3.0
(Wikipedia contributors). It is therefore **not committed**: the script rebuilds the same bytes
from the wheel, and the race files record the text's sha256.

Kept: main-namespace articles of at least 120 words that are not redirects, lists or
disambiguation pages, in dump order, each cut to its lead (whole paragraphs before the first
heading, up to 300 words), so that the first 16k tokens the race scores span some 40 subjects
rather than the first two long articles. Removed: templates, tables, references, comments,
files, categories, interlanguage links and HTML tags; links keep their shown text; lists and
emphasis marks lose their markup. Articles are separated by two blank lines, paragraphs by one.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WHEEL = "gensim==4.4.0"
MIN_WORDS = 120  # articles shorter than this (stubs, lists) are left out
HEADING = "\x00"  # marks a section heading inside clean()'s output
LEAD_WORDS = 300  # each article contributes its opening paragraphs up to this many words


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every balanced open_ ... close span (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _link(m: re.Match) -> str:
    target, _, shown = m.group(1).partition("|")
    if re.match(r"\s*(File|Image|Category|[a-z]{2,3}(-[a-z]+)?):", target):
        return ""
    return (shown or target).split("|")[-1]


def clean(wikitext: str) -> str:
    t = html.unescape(html.unescape(wikitext))  # the dump escapes once more (&amp;nbsp;)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    for _ in range(3):  # links inside file captions nest one or two deep
        t = re.sub(r"\[\[([^\[\]]*)\]\]", _link, t)
    t = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    lines = []
    for line in t.splitlines():
        line = line.strip()
        m = re.match(r"^(=+)\s*(.*?)\s*\1$", line)
        if m:
            lines += ["", HEADING + m.group(2), ""]
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line.startswith("|") or line.startswith("!"):
            continue
        lines.append(line)
    paras = re.split(r"\n\s*\n", "\n".join(lines))
    paras = [re.sub(r"\s+", " ", p).strip() for p in paras]
    paras = [p for p in paras if p]
    # cut the back matter (see also, notes, references, further reading, external links)
    for i, p in enumerate(paras):
        if p.startswith(HEADING) and p[1:].lower() in {"see also", "notes", "references", "further reading", "external links", "bibliography"}:
            paras = paras[:i]
            break
    return "\n\n".join(paras)


def lead(text: str) -> str:
    """The article's lead: its whole paragraphs before the first heading, at least one, until
    LEAD_WORDS words are reached."""
    kept, words = [], 0
    for p in text.split("\n\n"):
        if p.startswith(HEADING) or (kept and words + len(p.split()) > LEAD_WORDS):
            break
        kept.append(p)
        words += len(p.split())
    return "\n\n".join(kept)


def articles(xml: str) -> list[tuple[str, str]]:
    out = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        if "<ns>0</ns>" not in page or "<redirect" in page:
            continue
        title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
        if title.startswith("List of") or title.endswith("(disambiguation)"):
            continue
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if body is None:
            continue
        text = clean(body.group(1))
        if len(text.split()) >= MIN_WORDS:
            out.append((title, lead(text)))
    return out


def wheel_path(given: Path | None, work: Path) -> Path:
    if given is not None:
        return given
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), WHEEL], check=True)
    return next(work.glob("gensim-4.4.0-*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--wheel", type=Path, default=None, help="a downloaded gensim 4.4.0 wheel (else pip downloads it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel_path(args.wheel, Path(tmp))) as z:
            xml = bz2.decompress(z.read(MEMBER)).decode()
    docs = articles(xml)
    text = "\n\n\n".join(f"{title}\n\n{body}" for title, body in docs) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(args.out.suffix + ".part")
    tmp_out.write_text(text)
    tmp_out.replace(args.out)
    print(f"{args.out}: {len(docs)} articles, {len(text.split())} words, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
