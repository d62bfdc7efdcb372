"""The pages a user reads (README.md, CHANGELOG.md, docs/*.md) point at things that exist.

Which strings are repository paths, the rule `named_paths` applies:
- a Markdown link or image target that is not a URL (`https://...`, `mailto:`) is a path
  relative to its page's folder; an anchor (`page.md#a-heading`, `#a-heading`) must also be a
  heading of that page, as GitHub spells its anchors;
- in code (inline spans and fenced blocks), a token without spaces is a repository path when its
  first component is a top-level entry of the repository: a file or folder at its root that
  .gitignore does not exclude (`cbam_jax/...`, `scripts/...`, `docs/...`, `Makefile`, ...).
  Surrounding quotes and punctuation, a `:LINE` or `::test` suffix are dropped first; `*`
  globs must match a file and `{a,b}` braces expand to each name.
Run-time paths (`runs/...`, `checkpoints/best`, `./data`, `/tmp/...`, `~/.cache/...`,
`<data-dir>/...`) do not start with such an entry, so they are not checked; names that only
exist elsewhere (timm's `layers/cbam.py`) neither.
"""
import fnmatch
import glob
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USE_PAGES = ("recipe.md", "library.md", "training.md", "parity.md", "inference.md",
             "benchmarks.md", "gpu.md", "architecture.md")
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
URL = re.compile(r"^(https?|mailto):")


def top_level_entries(root: Path = ROOT) -> set:
    """Names at the repository's root that .gitignore does not exclude (and not .git)."""
    ignore = root / ".gitignore"
    patterns = [line.strip().strip("/") for line in
                (ignore.read_text().splitlines() if ignore.exists() else [])
                if line.strip() and not line.startswith("#")]
    return {p.name for p in root.iterdir()
            if p.name != ".git" and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)}


def code_of(text: str) -> list:
    """The page's code: each fenced block's body and each inline span outside them."""
    blocks = [body for _, body in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    return blocks + SPAN.findall(prose)


def prose_of(text: str) -> str:
    return FENCE.sub("", text)


def expand_braces(token: str) -> list:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not match:
        return [token]
    return list(itertools.chain.from_iterable(
        expand_braces(token[:match.start()] + option + token[match.end():])
        for option in match.group(1).split(",")))


def clean_token(token: str) -> str:
    token = token.strip("\"'`,;()[]")
    token = re.sub(r"::.*$", "", token)       # tests/test_x.py::test_name
    token = re.sub(r":\d+(-\d+)?$", "", token)  # file.py:71
    return token.rstrip(".,:;")


def named_paths(text: str, entries: set) -> list:
    """Repository paths that the code of `text` names (see the module docstring)."""
    paths = []
    for code in code_of(text):
        for raw in code.split():
            token = clean_token(raw)
            if token.startswith("./"):
                token = token[2:]
            first = token.split("/", 1)[0]
            if first in entries and "$" not in token and "<" not in token:
                paths.extend(expand_braces(token))
    return paths


def missing_paths(text: str, root: Path = ROOT) -> list:
    missing = []
    for path in named_paths(text, top_level_entries(root)):
        found = glob.glob(str(root / path)) if "*" in path else (root / path).exists()
        if not found:
            missing.append(path)
    return missing


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    found, seen = set(), {}
    for line in prose_of(page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = github_slug(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path, text: str | None = None) -> list:
    """Link targets of `page` (or of `text`, read as if it were that page) that do not exist."""
    text = page.read_text() if text is None else text
    broken = []
    for target in LINK.findall(prose_of(text)):
        if URL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or ROOT.resolve() not in (file, *file.parents):
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def outside_paths(text: str) -> list:
    """Paths in links or code that leave the repository: `../...`, absolute, home-relative."""
    found = [t for t in LINK.findall(prose_of(text))
             if not URL.match(t) and (t.startswith(("../", "/", "~")))]
    for code in code_of(text):
        found += [t for t in map(clean_token, code.split())
                  if t.startswith(("../", "~/")) or re.match(r"^/[\w.]", t)]
    return found


# --- the pages -------------------------------------------------------------------------------

def test_docs_has_one_page_per_use():
    assert [name for name in USE_PAGES if not (ROOT / "docs" / name).exists()] == []
    assert (ROOT / "CHANGELOG.md").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_exists(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_in_code_exists(page):
    assert missing_paths(page.read_text()) == []


def test_readme_names_no_path_outside_the_repository():
    assert outside_paths((ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_named_exists(page):
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    code = "\n".join(code_of(page.read_text()))
    commands = set(re.findall(r"(?<![\w/.-])(cbam-[a-z]+)\b", code)) - {"cbam-jax"}
    assert commands - scripts == set()
    assert set(re.findall(r"\bmake ([a-z][\w-]*)", code)) - targets == set()


# The repository speaks about the code and its users, not about how it was developed: no issue
# numbers (a third-party tracker is linked as owner/repo#N), no numbered periods of work, no
# first-person notes. In prose a bare "I" is first person; in code it is also Pillow's mode 'I'
# and struct's "<I", so there only "I" before a lowercase word counts.
ISSUE_NUMBER = r"\b[Ii]ssues? ?#?\d"
WORK_PERIODS = [r"\b[Ss]essions?\b(?!\s*=[^=]|\.\w)",  # not a variable: `x = ...`, `x.run`
                r"\b[Ww]ork periods?\b", r"\b[Tt]he lead\b", r"\b[Aa]ssistants?\b"]
FIRST_PERSON = [r"\b[Ww]e\b", r"\b[Mm]y\b", r"\b[Oo]ur\b"]
NARRATION = [ISSUE_NUMBER, *WORK_PERIODS, r"\bI\b(?!/)", *FIRST_PERSON]
CODE_NARRATION = [ISSUE_NUMBER, *WORK_PERIODS, r"\bI (?=[a-z])", r"\bI'(?:m|ve|d|ll)\b",
                  *FIRST_PERSON]
CODE = sorted(path for folder in ("cbam_jax", "parity", "scripts", "tests")
              for path in (ROOT / folder).rglob("*")
              if path.suffix in (".py", ".sh") and "__pycache__" not in path.parts)
CODE += [ROOT / "Makefile"]
# cbam_jax/runtime.py's comments on the CPU settings are rewritten with those settings' next
# measurements; until then they still name the section they came from.


def narration(text: str, patterns) -> list:
    return [m.group(0) for pattern in patterns for m in re.finditer(pattern, text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_pages_tell_no_development_story(page):
    assert narration(prose_of(page.read_text()), NARRATION) == []


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_comments_and_docstrings_tell_no_development_story(path):
    lines = path.read_text().splitlines()
    assert [(number, found) for number, line in enumerate(lines, start=1)
            for found in narration(line, CODE_NARRATION)] == []


def test_every_cpu_setting_has_its_measured_row():
    """Each setting `runtime.configure_cpu` makes is in benchmarks.md's table of the engine's
    CPU settings, under the name `scripts/benchmark.py --ablate` takes, with its figures."""
    from cbam_jax.runtime import CPU_TUNINGS

    table = (ROOT / "docs" / "benchmarks.md").read_text().split("### The engine's CPU settings")[1]
    rows = {line.split("(`", 1)[1].split("`", 1)[0]: line for line in table.splitlines()
            if line.startswith("| ") and "(`" in line}
    for name in (*CPU_TUNINGS, "devices_per_core"):
        assert name in rows, name
        assert re.search(r"\*\*\d\.\d\dx\*\*", rows[name]), rows[name]  # its kept gain, in bold


# The fast forms in cbam_jax/ops/fused.py each name the row of docs/benchmarks.md that keeps
# them: `row "..."` or `rows "...", "..." and "..."`, quoted as the table spells it.
CITED_ROWS = re.compile(r'\brows? ((?:"[^"]+"(?: \([^)]*\))?(?:,? (?:and )?)?)+)')


def cited_rows(text: str) -> list:
    """The rows that `text` (code: comment marks and indentation are dropped) cites."""
    joined = " ".join(line.strip().lstrip("#").strip() for line in text.splitlines())
    return [row for group in CITED_ROWS.findall(joined) for row in re.findall(r'"([^"]+)"', group)]


def missing_rows(text: str, table: str) -> list:
    """The rows cited in `text` that no cell of the Markdown `table` starts with."""
    table = " ".join(table.split())
    return [row for row in cited_rows(text) if f"| {row}" not in table]


def test_every_benchmark_row_the_fast_forms_cite_exists():
    fused = (ROOT / "cbam_jax" / "ops" / "fused.py").read_text()
    assert len(cited_rows(fused)) >= 10
    assert missing_rows(fused, (ROOT / "docs" / "benchmarks.md").read_text()) == []


def test_a_cited_row_that_is_not_in_the_table_is_found():
    text = ('Kept by docs/benchmarks.md, rows "no conv bias in\n    # training" (1.03x) and '
            '"a row"')
    assert cited_rows(text) == ["no conv bias in training", "a row"]
    table = "| no conv bias in training (`ops.fused.x`) | ... |\n| another row | ... |"
    assert missing_rows(text, table) == ["a row"]


def test_readme_and_benchmarks_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 250


# --- the checks themselves can fail ----------------------------------------------------------

def test_a_missing_path_or_link_is_reported_and_run_time_paths_are_not():
    text = ("Run `scripts/no_such_script.py`, then `cbam_jax/{layers,nothing}.py` and\n"
            "```bash\npython scripts/train.py --run-dir runs/CBAM_CNN_experiment\n```\n"
            "Outputs: `runs/x/checkpoints/best`, `/tmp/sweep`, `~/.cache/cbam_jax/jax`,\n"
            "`<data-dir>/cifar10/`, `checkpoints/best/7`, timm's `layers/cbam.py`.\n"
            "[a page](docs/no_such_page.md), [an anchor](docs/gpu.md#no-such-heading),\n"
            "[fine](docs/gpu.md#offline), [a site](https://example.org/x.md)\n")
    assert missing_paths(text) == ["scripts/no_such_script.py", "cbam_jax/nothing.py"]
    assert broken_links(ROOT / "README.md", text) == ["docs/no_such_page.md",
                                                      "docs/gpu.md#no-such-heading"]


def test_a_path_outside_the_repository_is_reported():
    text = "See `../notes/plan.md` and [the plan](../notes/plan.md), or `/home/me/x.py`."
    assert outside_paths(text) == ["../notes/plan.md", "../notes/plan.md", "/home/me/x.py"]
    assert outside_paths("`runs/CBAM_CNN_experiment` and [docs](docs/gpu.md)") == []


def spelled(*parts: str) -> str:
    """`parts` joined: this file spells what the narration checks look for in parts, so that it
    does not hold them itself."""
    return "".join(parts)


def test_narration_is_found_in_prose_and_in_code():
    text = spelled("As I", " measured in iss", "ue 12, w", "e kept m", "y change in the seventh ",
                   "ses", "sion; jax-ml/jax#12868 is a link.")
    assert narration(text, NARRATION) == ["iss" "ue 1", "ses" "sion", "I", "w" "e", "m" "y"]
    code = spelled("# I", " measured it in o", "ur work per", "iods; mode 'I' and \"<I\" are ",
                   "code\n", "ses", "sion = onnxruntime.InferenceSes", "sion(path); ses",
                   "sion.run(x)\n")
    assert narration(code, CODE_NARRATION) == ["work per" "iods", "I ", "o" "ur"]


def test_github_slugs():
    assert github_slug("Presets: the tutorial's, the official and timm's CBAM") == (
        "presets-the-tutorials-the-official-and-timms-cbam")
    assert github_slug("nnx: per-step overhead") == "nnx-per-step-overhead"


# --- the pages' Python examples run ---------------------------------------------------------

EXAMPLES = [(page, i, body) for page in PAGES if page.name != "README.md"
            for i, (lang, body) in enumerate(
                (lang, body) for lang, body in FENCE.findall(page.read_text())
                if lang == "python")]


@pytest.mark.parametrize("page, index, body", EXAMPLES,
                         ids=[f"{p.name}-{i}" for p, i, _ in EXAMPLES])
def test_docs_python_example_runs(page, index, body, tmp_path):
    script = tmp_path / f"{page.stem}_example_{index}.py"
    script.write_text(body)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
