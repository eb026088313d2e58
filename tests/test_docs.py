"""What README.md and docs/*.md name exists: links, modules, params keys and overrides, tests, the test command."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from src.config import ConfigError, Params, apply_overrides, flatten

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
IDS = [str(page.relative_to(REPO)) for page in PAGES]
SECTIONS = ("paths", "data", "split", "model", "train", "evaluate", "tracking", "tune")
KEYS = frozenset(flatten(Params()))
# written in the docs as the unknown key of an error message: they must stay unknown
NOT_KEYS = frozenset({"train.learning_rate"})

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MODULE = re.compile(r"-m\s+src\.([\w.]+)")
OVERRIDE = re.compile(r"(?:^|\s)-S\s+['\"]?([A-Za-z_][\w.]*=[^\s'\"]*)")
KEY = rf"(?:{'|'.join(SECTIONS)})\.[A-Za-z_]\w*(?:\.(?:[A-Za-z_]\w*|\*))*"
KEY_SPAN = re.compile(rf"({KEY})(?:=\S*|: .*)?")
ASSIGNMENT = re.compile(rf"({KEY})=\S*")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")  # `=N`, `=SEC`: a value the reader fills in
FILE_NAME = re.compile(r"\.(json|csv|ya?ml|py|png|pt|md|npy|db|txt|safetensors)$")
NODE = re.compile(r"tests/[\w/]*test_\w+\.py(?:::\w+)*")


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def code_lines(text: str) -> list[str]:
    """Each command line of the page: a fenced block's lines (backslash continuations joined) and each inline span."""
    lines = []
    for block in FENCE.findall(text):
        body = block.split("\n")[1:-1]
        lines.extend(re.sub(r"\\\n\s*", " ", "\n".join(body)).split("\n"))
    lines.extend(INLINE_CODE.findall(prose(text)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The page's heading anchors; a repeated heading gets -1, -2, ... as on GitHub."""
    found, counts = set(), {}
    for heading in HEADING.findall(prose(read(page))):
        base = slug(heading)
        found.add(base if base not in counts else f"{base}-{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return found


def tracking_tags() -> set[str]:
    """`section.key` strings that src/tracking writes as MLflow tags (`data.split_hash`), which are no params."""
    tags = set()
    for path in (REPO / "src" / "tracking").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(KEY, value) and not FILE_NAME.search(value):
                tags.add(value)
    return tags


def is_key(name: str) -> bool:
    """A params key, or `section.*` / `train.augment.*`: a section or group that has keys."""
    if name.endswith(".*"):
        return any(key.startswith(name[:-1]) for key in KEYS)
    return name in KEYS


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(read(page)))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked})")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_modules_named_are_entry_points(page):
    missing = sorted(
        {name for name in MODULE.findall(read(page)) if not (REPO / "src" / f"{name.rstrip('.')}.py").is_file()}
    )
    assert not missing, f"{page.relative_to(REPO)}: `python -m src.X` with no entry module src/X.py: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_params_keys_named_exist(page):
    tags = tracking_tags()
    named = set()
    for span in INLINE_CODE.findall(prose(read(page))):
        if FILE_NAME.search(span):
            continue
        match = KEY_SPAN.fullmatch(span.strip())
        if match:
            named.add(match.group(1))
        elif all(ASSIGNMENT.fullmatch(token) for token in span.split()):  # `train.lr=0.0006 train.epochs=8`
            named.update(ASSIGNMENT.fullmatch(token).group(1) for token in span.split())
    unknown = sorted(name for name in named if not is_key(name) and name not in tags and name not in NOT_KEYS)
    assert not unknown, f"{page.relative_to(REPO)}: params keys that src.config.Params does not have: {unknown}"
    assert not NOT_KEYS & KEYS, f"the docs' example of an unknown key is a key now: {sorted(NOT_KEYS & KEYS)}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_overrides_are_accepted(page):
    refused = []
    for line in code_lines(read(page)):
        overrides = [o for o in OVERRIDE.findall(line) if o not in ("key=value", "section.key=value")]
        unknown = [o for o in overrides if o.partition("=")[0] not in KEYS]
        if unknown:
            refused.append(f"{' '.join(f'-S {o}' for o in unknown)}: unknown key")
            continue
        # `data.local_path=PATH` is a value src.config takes as it is; `train.batch_size=N` one the reader fills in
        filled = [o for o in overrides if not PLACEHOLDER.fullmatch(o.partition("=")[2])]
        try:
            apply_overrides(Params(), overrides)
        except ConfigError as error:
            try:
                apply_overrides(Params(), filled)
            except ConfigError:
                refused.append(f"{' '.join(f'-S {o}' for o in overrides)}: {' '.join(str(error).split())[:300]}")
    assert not refused, f"{page.relative_to(REPO)}: -S overrides that src.config refuses: {refused}"


@pytest.fixture(scope="module")
def collected() -> list[str]:
    """The node ids of the whole suite, collected once (it imports every test module: tens of seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # collect every test, whatever is selected
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # a module that fails to import is reported by its own tests; here it only hides the tests it holds
    ids = [line.strip() for line in result.stdout.splitlines() if "::" in line]
    assert ids, result.stdout[-2000:] + result.stderr[-2000:]
    return ids


def test_tests_named_in_the_docs_exist(collected):
    missing = []
    for page in PAGES:
        for node in sorted(set(NODE.findall(read(page)))):
            if not any(i == node or i.startswith((f"{node}[", f"{node}::")) for i in collected):
                missing.append(f"{page.relative_to(REPO)}: {node}")
    assert not missing, f"tests named in the docs that pytest does not collect: {missing}"


def test_the_params_list_names_every_key():
    # the other direction: a key added to src.config is documented in pipeline.md's Params list, in its section's item
    params = read(REPO / "docs" / "pipeline.md").split("\n## Params", 1)[1]
    items = dict(re.findall(r"^- `(\w+)`:(.*?)(?=^- `|^#|\Z)", params, re.MULTILINE | re.DOTALL))
    unnamed = [key for key in sorted(KEYS) if f"`{key.rpartition('.')[2]}`" not in items.get(key.partition(".")[0], "")]
    assert not unnamed, f"docs/pipeline.md, Params: keys of src.config.Params it does not name: {unnamed}"


def test_the_failure_table_names_tests():
    assert len(set(NODE.findall(read(REPO / "docs" / "failures.md")))) >= 50


def test_readme_test_command_is_what_ci_runs():
    readme = read(REPO / "README.md")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    (readme_command,) = [line for block in FENCE.findall(section) for line in block.splitlines() if "pytest" in line]
    ci_command = [line for line in read(REPO / ".ci" / "run").splitlines() if line.strip()][-1]

    def words(command: str) -> list[str]:
        return [word for word in shlex.split(command) if word != "-q"]  # CI installs quietly; the same command

    assert words(readme_command) == words(ci_command), (
        f"README's test command {readme_command!r} is not the one .ci/run runs: {ci_command!r}"
    )


@pytest.mark.parametrize("page", PAGES[1:], ids=IDS[1:])
def test_every_guide_page_says_what_it_is_for(page):
    title, _, rest = read(page).partition("\n\n")
    assert title.startswith("# ") and rest.startswith("What you can do with it: "), (
        f"{page.relative_to(REPO)}: the title, then a paragraph starting 'What you can do with it: '"
    )


def test_every_guide_page_is_linked_from_the_readme():
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(prose(read(REPO / "README.md")))}
    unlinked = sorted(page.name for page in PAGES[1:] if page.name not in linked)
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
