"""The rendered book, checked in a real browser.

Run after `make book` (``make test`` does both). For every page listed in ``_toc.yml`` this
serves ``_build/html`` on a free localhost port, loads the page in headless Chromium with every
non-local host name unresolvable (so the check also proves the book works offline), and checks
the DOM after scripts ran:

* the page loaded (book title in ``<title>``, a main article);
* every math element was typeset by MathJax (``mjx-container``) with no MathJax error;
* every ``<img>`` resolves to a file of the build (``data:`` URIs are fine) and chapters that plot
  with matplotlib show at least one figure;
* no error output: no traceback, no error/stderr output mentioning an error or exception, no
  broken citation or cross-reference.

Static checks (page exists, MathJax and every other script/stylesheet is local, images exist on
disk, no traceback in the HTML) run even where Chromium is missing; the browser checks are then
skipped with a message saying how to install it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
TOC = ROOT / "_toc.yml"
CONFIG = ROOT / "_config.yml"

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BROWSER_TIMEOUT_S = 90
WORKERS = 2

NEED_BUILD = "no _build/html/index.html: run `make book` first (or `make test`, which builds it)"
NEED_CHROMIUM = (
    "no Chromium found (looked for: {}); install it with `apt-get install chromium` "
    "or run `bash .ci/run`, which installs it and runs `make test`".format(", ".join(BROWSERS))
)


# --------------------------------------------------------------------------------------------
# Pages of the book, from _toc.yml


def _toc_files(node) -> list[str]:
    """Every `file:` (and expanded `glob:`) of a sphinx-external-toc tree, in reading order."""
    out: list[str] = []
    if isinstance(node, dict):
        if "root" in node:
            out.append(node["root"])
        if "file" in node:
            out.append(node["file"])
        if "glob" in node:
            for p in sorted(ROOT.glob(node["glob"] + ".*")):
                if p.suffix in (".md", ".ipynb"):
                    out.append(p.relative_to(ROOT).with_suffix("").as_posix())
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key) or []:
                out.extend(_toc_files(child))
    elif isinstance(node, list):
        for child in node:
            out.extend(_toc_files(child))
    return out


def _strip_suffix(doc: str) -> str:
    for suffix in (".md", ".ipynb", ".rst"):
        if doc.endswith(suffix):
            return doc[: -len(suffix)]
    return doc


def book_pages() -> list[str]:
    """Docnames of the book (e.g. 'book/intro', 'chapters/01_ddpm'), without duplicates."""
    docs = [_strip_suffix(d) for d in _toc_files(yaml.safe_load(TOC.read_text()))]
    return list(dict.fromkeys(docs))


def book_title() -> str:
    return str(yaml.safe_load(CONFIG.read_text())["title"]).strip()


PAGES = book_pages()


def source_of(doc: str) -> Path | None:
    for suffix in (".ipynb", ".md", ".rst"):
        p = ROOT / (doc + suffix)
        if p.exists():
            return p
    return None


def page_path(doc: str) -> Path:
    return HTML / (doc + ".html")


def read_page(doc: str) -> str:
    if not (HTML / "index.html").exists():
        pytest.fail(NEED_BUILD)
    path = page_path(doc)
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing although {doc} is in _toc.yml: {NEED_BUILD}")
    return path.read_text(encoding="utf-8")


def soup_of(html: str) -> BeautifulSoup:
    return BeautifulSoup(html, "html.parser")


def classes(tag) -> list[str]:
    return tag.get("class") or []


def notebook_plots(doc: str) -> bool:
    """Whether a chapter notebook's code draws with matplotlib (so its page must show a figure)."""
    src = source_of(doc)
    if src is None or src.suffix != ".ipynb":
        return False
    nb = json.loads(src.read_text(encoding="utf-8"))
    code = "\n".join(
        "".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
        for c in nb.get("cells", [])
        if c.get("cell_type") == "code"
    )
    return bool(re.search(r"\bplt\.(show|subplots?|figure|imshow|plot)\b|matplotlib", code))


# --------------------------------------------------------------------------------------------
# Checks shared by the static and the browser tests

TRACEBACK = "Traceback (most recent call last)"
ERROR_WORD = re.compile(r"\b\w*(Error|Exception)\b")
EXCEPTION_LINE = re.compile(r"^\s*\w*(Error|Exception)\b(:|$)", re.M)
# The text/plain form of a tqdm.auto widget: captured when the bar is created, so always 0%.
FROZEN_PROGRESS = re.compile(r"(^|\s)0%\|.*\| 0/\d+ \[")


def error_outputs(soup: BeautifulSoup) -> list[str]:
    """Human-readable descriptions of every error shown on a page."""
    problems = []
    text = soup.get_text(" ")
    if TRACEBACK in text:
        problems.append(f"the page shows a Python traceback ({TRACEBACK!r})")
    for tag in soup.find_all(True):
        cls = classes(tag)
        if not cls:
            continue
        snippet = " ".join(tag.get_text(" ").split())[:300]
        if "traceback" in cls or "output_error" in cls or ("output" in cls and "error" in cls):
            problems.append(f"error output ({' '.join(cls)}): {snippet!r}")
        elif "stderr" in cls and ERROR_WORD.search(tag.get_text(" ")):
            problems.append(f"stderr output mentioning an error: {snippet!r}")
        elif "output" in cls and "stream" in cls and EXCEPTION_LINE.search(tag.get_text("\n")):
            problems.append(f"stream output with an exception: {snippet!r}")
        elif "text_plain" in cls and FROZEN_PROGRESS.search(tag.get_text(" ")):
            problems.append(
                f"a tqdm.auto progress bar frozen at its first state: {snippet!r} (in the book, "
                "run training loops with their progress bar off, e.g. progress=False)"
            )
        elif "bibtex-citation" in cls:
            t = tag.get_text("").strip()
            if t in ("[]", "()", "") or "?" in t:
                problems.append(f"broken citation rendered as {t!r}")
        elif "xref" in cls and tag.find_parent("a") is None and tag.name in ("span", "code"):
            problems.append(f"unresolved cross-reference: {snippet!r}")
    for phrase in ("[?]", "unknown citation", "could not find bibtex key"):
        if phrase in text:
            problems.append(f"broken citation: the page contains {phrase!r}")
    return problems


def image_problems(soup: BeautifulSoup, doc: str, page_url: str | None = None) -> list[str]:
    """Every <img src> must be a data: URI or a file of the build."""
    problems = []
    base = page_url or f"http://book.invalid/{doc}.html"
    base_netloc = urlsplit(base).netloc
    for img in soup.find_all("img"):
        src = (img.get("src") or "").strip()
        if not src:
            problems.append(f"<img> without src: {img}")
            continue
        if src.startswith("data:"):
            continue
        url = urlsplit(urljoin(base, src))
        if url.netloc != base_netloc:
            problems.append(f"image loaded from outside the book: {src}")
            continue
        target = HTML / unquote(url.path).lstrip("/")
        if not target.is_file() or target.stat().st_size == 0:
            problems.append(f"image {src} -> {target.relative_to(ROOT)} does not exist or is empty")
    return problems


def external_assets(soup: BeautifulSoup) -> list[str]:
    """Scripts, stylesheets and fonts loaded from the network (the book must work offline)."""
    found = []
    for tag in soup.find_all("script", src=True):
        if re.match(r"^(https?:)?//", tag["src"]):
            found.append(f"<script src={tag['src']!r}>")
    for tag in soup.find_all("link", href=True):
        rel = " ".join(tag.get("rel") or [])
        if re.search(r"stylesheet|preload|modulepreload|icon", rel) and re.match(
            r"^(https?:)?//", tag["href"]
        ):
            found.append(f"<link rel={rel!r} href={tag['href']!r}>")
    return found


def math_elements(soup: BeautifulSoup) -> list:
    """Elements MathJax is asked to typeset (sphinx renders every equation with class "math")."""
    return [t for t in soup.find_all(["span", "div"]) if "math" in classes(t)]


# --------------------------------------------------------------------------------------------
# Static tests (no browser needed)


def test_book_is_built():
    assert (HTML / "index.html").exists(), NEED_BUILD


def test_toc_lists_pages():
    assert PAGES, "_toc.yml lists no pages"
    missing = [d for d in PAGES if source_of(d) is None]
    assert not missing, f"_toc.yml lists pages with no source file: {missing}"


@pytest.mark.parametrize("doc", PAGES)
def test_page_static(doc):
    soup = soup_of(read_page(doc))
    problems = error_outputs(soup) + image_problems(soup, doc) + [
        f"loaded from the network: {a}" for a in external_assets(soup)
    ]
    assert not problems, f"{doc}.html:\n  " + "\n  ".join(problems)


def test_mathjax_is_local():
    """MathJax is served from _static/ of the build, never from a CDN."""
    pages_with_math = 0
    for doc in PAGES:
        soup = soup_of(read_page(doc))
        if not math_elements(soup):
            continue
        pages_with_math += 1
        scripts = [s["src"] for s in soup.find_all("script", src=True) if "mathjax" in s["src"].lower()]
        assert scripts, f"{doc}.html has math but loads no MathJax script"
        for src in scripts:
            assert not re.match(r"^(https?:)?//", src), f"{doc}.html loads MathJax from the network: {src}"
            target = (page_path(doc).parent / src.split("?")[0]).resolve()
            assert target.is_file(), f"{doc}.html: MathJax script {src} -> {target} does not exist"
    assert pages_with_math, "no page of the book contains math: is dollarmath enabled?"
    assert (HTML / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir(), (
        "MathJax fonts are missing from _build/html/_static/mathjax (sphinx-mathjax-offline)"
    )


# --------------------------------------------------------------------------------------------
# Browser tests


def find_browser() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="session")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail(NEED_BUILD)
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def dump_dom(browser: str, url: str) -> tuple[str, str]:
    """The DOM of `url` after its scripts ran, and Chromium's stderr."""
    profile = tempfile.mkdtemp(prefix="diffkit-chromium-")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--mute-audio",
        "--hide-scrollbars",
        # Page console messages (JS errors, failed loads) go to stderr; see console_errors().
        "--enable-logging=stderr",
        "--v=0",
        # Offline: every host but the local server is unresolvable.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return "", f"chromium did not finish within {BROWSER_TIMEOUT_S} s"
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return proc.stdout, proc.stderr


CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\]\s*(.*)")
# Known, harmless: sphinx-thebe (loaded by every Jupyter Book 1) emits its `const THEBE_JS_URL`
# inline script twice per page; the second copy throws. Thebe is off in this book.
KNOWN_CONSOLE_NOISE = ("Identifier 'THEBE_JS_URL' has already been declared",)


def console_errors(stderr: str) -> list[str]:
    """Uncaught JavaScript errors and failed resource loads reported by the page."""
    errors = []
    for line in stderr.splitlines():
        m = CONSOLE.search(line)
        if not m:
            continue
        msg = m.group(1)
        if any(noise in msg for noise in KNOWN_CONSOLE_NOISE):
            continue
        if re.search(r"Uncaught|Failed to load resource|MathJax.*(error|fail)", msg, re.I):
            errors.append(msg[:300])
    return errors


@pytest.fixture(scope="session")
def browser():
    path = find_browser()
    if path is None:
        pytest.skip(NEED_CHROMIUM)
    return path


@pytest.fixture(scope="session")
def doms(browser, server):
    """Every page of the book, loaded once, WORKERS pages at a time."""
    for doc in PAGES:
        read_page(doc)  # fail early and clearly on a missing page
    urls = {doc: urljoin(server, doc + ".html") for doc in PAGES}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {doc: pool.submit(dump_dom, browser, url) for doc, url in urls.items()}
        return {doc: (urls[doc],) + fut.result() for doc, fut in futures.items()}


@pytest.mark.parametrize("doc", PAGES)
def test_page_in_browser(doc, doms):
    url, dom, stderr = doms[doc]
    where = f"{doc}.html ({url})"
    assert dom.strip(), f"{where}: Chromium returned no DOM. stderr:\n{stderr[-3000:]}"
    soup = soup_of(dom)

    # 1. The page loaded: the book's title and a main article.
    title = soup.title.get_text() if soup.title else ""
    assert book_title() in title, f"{where}: title {title!r} lacks the book title {book_title()!r}"
    article = soup.find("article") or soup.find("main")
    assert article is not None and article.get_text(strip=True), f"{where}: no main article"

    problems = []

    # 2. Math typeset by MathJax, without errors.
    static_math = math_elements(soup_of(read_page(doc)))
    if static_math:
        if not soup.find("mjx-container"):
            problems.append(
                f"{len(static_math)} math element(s) but no MathJax output (mjx-container): "
                "MathJax did not load or did not run"
            )
        else:
            for el in math_elements(soup):
                if not el.find("mjx-container"):
                    problems.append(f"math not typeset: {' '.join(el.get_text(' ').split())[:200]!r}")
    for err in soup.find_all("mjx-merror"):
        problems.append(f"MathJax error: {err.get('data-mjx-error') or err.get_text(' ')[:200]!r}")
    for red in soup.find_all("mtext", attrs={"mathcolor": "red"}):
        problems.append(f"undefined TeX macro (rendered in red): {red.get_text()[:100]!r}")
    if "Math input error" in soup.get_text(" "):
        problems.append("MathJax reports 'Math input error'")

    # 3. Images exist; plotting chapters show figures.
    problems += image_problems(soup, doc, url)
    if notebook_plots(doc) and not article.find("img"):
        problems.append(
            "the notebook plots with matplotlib but the page shows no image "
            "(is MPLBACKEND=Agg leaking into the kernel? the inline backend is needed)"
        )

    # 4. No error output anywhere on the page, no JavaScript error, no failed load.
    problems += error_outputs(soup)
    problems += [f"browser console: {msg}" for msg in console_errors(stderr)]

    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


def test_index_redirects_into_book(browser, server):
    """_build/html/index.html opens the book's first page."""
    dom, stderr = dump_dom(browser, server + "index.html")
    soup = soup_of(dom)
    title = soup.title.get_text() if soup.title else ""
    assert book_title() in title, f"index.html did not open the book (title {title!r}); stderr:\n{stderr[-2000:]}"


# --------------------------------------------------------------------------------------------
# Practice mode: the interview page folds its answers


INTERVIEW = "book/interview"
# A page of the same origin that loads the interview page in a frame, then acts as a reader:
# checks the first answer is hidden, opens it, checks it shows, and uses the page's one button
# to open and then close every answer. It writes what it saw into #result for --dump-dom.
FOLD_HARNESS = """<!DOCTYPE html><html><head><title>fold check</title></head><body>
<pre id="result">pending</pre>
<iframe id="page" src="{src}" width="1200" height="900"></iframe>
<script>
document.getElementById("page").addEventListener("load", function () {{
  var out = {{}};
  try {{
    var doc = this.contentDocument;
    var answers = Array.from(doc.querySelectorAll("details.diffkit-answer"));
    var first = answers[0];
    var body = first.querySelector(".sd-summary-content") || first.lastElementChild;
    // checkVisibility: false inside a closed <details>, whose content Chromium keeps laid out
    // but hidden (content-visibility), where offsetHeight alone would still be > 0
    function shown(el) {{ return el.checkVisibility() && el.offsetHeight > 0; }}
    out.question_shown = shown(first.querySelector("summary"));
    out.answers = answers.length;
    out.folded_at_load = answers.filter(function (d) {{ return !d.open; }}).length;
    out.hidden_before = !shown(body);
    first.querySelector("summary").click();
    out.shown_after_click = shown(body);
    out.has_link = !!body.querySelector("a.reference.internal");
    var button = doc.querySelector("button.diffkit-toggle-answers");
    out.buttons = doc.querySelectorAll("button.diffkit-toggle-answers").length;
    button.click();
    out.all_open = answers.every(function (d) {{ return d.open; }});
    button.click();
    out.all_closed = answers.every(function (d) {{ return !d.open; }});
  }} catch (e) {{ out.error = String(e); }}
  document.getElementById("result").textContent = JSON.stringify(out);
}});
</script></body></html>"""


FOLDING_PAGES = [doc for doc in PAGES if source_of(doc) is not None
                 and "diffkit-answer" in source_of(doc).read_text()]


def test_the_interview_page_and_every_chapter_with_questions_fold_them():
    assert INTERVIEW in FOLDING_PAGES and len(FOLDING_PAGES) >= 10, FOLDING_PAGES


@pytest.mark.parametrize("doc", FOLDING_PAGES)
def test_answers_are_folded_with_a_link_each_and_one_button(doc):
    soup = soup_of(read_page(doc))
    answers = soup.select("details.diffkit-answer")
    written = source_of(doc).read_text().count(":class-container: diffkit-answer")
    assert written >= 1 and len(answers) == written, (doc, written, len(answers))
    assert not [d for d in answers if d.has_attr("open")], f"{doc}: an answer is open at load"
    assert len(soup.select("button.diffkit-toggle-answers")) == 1, doc
    if doc == INTERVIEW:      # its answers are short: each links to the section that measures it
        assert written >= 30
        unlinked = [d.summary.get_text(" ", strip=True)[:80] for d in answers
                    if not d.select("a.reference.internal")]
        assert not unlinked, f"answers without a link to their section: {unlinked}"


def test_reader_opens_a_folded_answer_and_all_of_them(browser, server):
    harness = HTML / "_diffkit_fold_check.html"
    harness.write_text(FOLD_HARNESS.format(src=INTERVIEW + ".html"))
    try:
        dom, stderr = dump_dom(browser, server + harness.name)
    finally:
        harness.unlink(missing_ok=True)
    result = soup_of(dom).find(id="result")
    assert result is not None and result.get_text() != "pending", (
        f"the check page did not run; stderr:\n{stderr[-2000:]}")
    seen = json.loads(result.get_text())
    assert "error" not in seen, seen
    assert seen["answers"] >= 30 and seen["folded_at_load"] == seen["answers"], seen
    assert seen["question_shown"] and seen["hidden_before"], seen        # question, no answer
    assert seen["shown_after_click"] and seen["has_link"], seen
    assert seen["buttons"] == 1 and seen["all_open"] and seen["all_closed"], seen
