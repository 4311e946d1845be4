"""The documentation names only options, variables and flags that the code has.

Three lists live in two places: the `BatchConfig` fields (docs/configuration.md), the
environment variables (anywhere in docs/), and the flags of the ``joblib-azurebatch``
command (docs/cli.md, docs/emulator.md). Each test takes the truth from the code (the
dataclass, the package's string literals, the argparse parser), so that it follows the code
as it changes, and a failure lists every missing or unknown name with its page and line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib_azurebatch
from joblib_azurebatch import config
from joblib_azurebatch.cli import PROG, build_parser
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = Path(joblib_azurebatch.__file__).resolve().parent
#: The test harnesses whose own variables the docs describe (docs/cloud-tests.md,
#: docs/conformance.md): they read them, the package does not.
HARNESSES = (ROOT / "tests" / "cloud", ROOT / "tests" / "joblib_conformance")

ENV_NAME = re.compile(r"JOBLIB_AZUREBATCH_[A-Z0-9_]+")
CODE_NAME = re.compile(r"`([^`\n]+)`")
#: Where each command's flags must be documented; docs/cli.md for every other command.
FLAG_PAGES = {"emulator": ("cli.md", "emulator.md")}


# --------------------------------------------------------------------------- reading docs


def doc_pages() -> list[Path]:
    pages = sorted(DOCS.glob("*.md"))
    assert pages, f"no pages in {DOCS}"
    return pages


def where(page: Path, line: int) -> str:
    return f"docs/{page.name}:{line}"


@dataclass(frozen=True)
class Table:
    """A Markdown table: its header cells and its rows, each with its line number."""

    line: int
    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]


def _cells(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def tables(page: Path) -> list[Table]:
    """The tables of a page (outside fenced code blocks)."""
    found: list[Table] = []
    block: list[tuple[int, str]] = []
    fenced = False
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate([*lines, ""], start=1):
        if text.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and text.lstrip().startswith("|"):
            block.append((number, text))
            continue
        if len(block) >= 2 and set(block[1][1].replace("|", "").strip()) <= set("-: "):
            rows = tuple((n, _cells(t)) for n, t in block[2:])
            found.append(Table(block[0][0], _cells(block[0][1]), rows))
        block = []
    return found


def code_names(cell: str) -> list[str]:
    """The names a table cell writes as code: `` `pool_id`, `vm_size` `` gives both."""
    return [name.strip() for name in CODE_NAME.findall(cell)]


def code_spans(page: Path) -> Iterator[tuple[int, str]]:
    """Every piece of code on a page with its first line: each line of a fenced block, and
    each inline `span` (which may run over a line break)."""
    text = page.read_text(encoding="utf-8")
    prose: list[str] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            prose.append("")
            continue
        if fenced:
            yield number, line
            prose.append("")
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        yield joined.count("\n", 0, match.start()) + 1, match.group(1)


# --------------------------------------------------------------------------- (a) options


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(BatchConfig)}


def config_tables() -> tuple[list[Table], list[Table]]:
    """The field tables and the SuperBatch keyword tables of docs/configuration.md."""
    found = tables(DOCS / "configuration.md")
    fields = [t for t in found if t.header[0].lower() == "field"]
    keywords = [t for t in found if t.header[0].lower() == "superbatch keyword"]
    assert fields, "docs/configuration.md has no table whose first column is 'field'"
    return fields, keywords


def test_every_field_is_documented_and_every_documented_field_exists() -> None:
    fields = field_names()
    documented: set[str] = set()
    unknown: list[str] = []
    for table in config_tables()[0]:
        for line, cells in table.rows:
            for name in code_names(cells[0]):
                documented.add(name)
                if name not in fields:
                    unknown.append(f"{where(DOCS / 'configuration.md', line)}: {name}")
    missing = sorted(fields - documented)
    assert not missing, (
        "BatchConfig fields with no row in a 'field' table of docs/configuration.md: "
        + ", ".join(missing)
    )
    assert not unknown, "options in docs/configuration.md that BatchConfig does not have:\n" + (
        "\n".join(unknown)
    )


def test_each_field_row_names_the_variables_from_env_reads() -> None:
    """The 'environment' column lists, in order, the variables of the row's fields."""
    wrong: list[str] = []
    for table in config_tables()[0]:
        column = [h.lower() for h in table.header].index("environment")
        for line, cells in table.rows:
            names = [n for n in code_names(cells[0]) if n in field_names()]
            expected = [v for n in names for v in BatchConfig.ENV_VARS.get(n, ())]
            written = code_names(cells[column])
            if written != expected:
                wrong.append(
                    f"{where(DOCS / 'configuration.md', line)}: {', '.join(names)}: the page "
                    f"says {written or 'nothing'}, BatchConfig.ENV_VARS says {expected or 'none'}"
                )
    assert not wrong, "environment columns that differ from the code:\n" + "\n".join(wrong)


def test_superbatch_keywords_are_documented_as_from_env_takes_them() -> None:
    tables_ = config_tables()[1]
    assert tables_, "docs/configuration.md has no 'SuperBatch keyword' table"
    page = DOCS / "configuration.md"
    documented: set[str] = set()
    wrong: list[str] = []
    for table in tables_:
        for line, cells in table.rows:
            targets = code_names(cells[1])
            for keyword in code_names(cells[0]):
                documented.add(keyword)
                field = BatchConfig.SUPERBATCH_KEYWORDS.get(keyword)
                if field is None:
                    # A keyword listed without a field must be one that from_env refuses on
                    # purpose: its error is about that keyword, not a list of the options.
                    try:
                        BatchConfig.from_env(environ={}, **{keyword: "x"})
                    except ConfigError as e:
                        if str(e).startswith(keyword):
                            continue
                    wrong.append(f"{where(page, line)}: {keyword} is not a keyword of from_env")
                elif field not in targets:
                    wrong.append(f"{where(page, line)}: {keyword} sets {field}, not {targets}")
    missing = sorted(set(BatchConfig.SUPERBATCH_KEYWORDS) - documented)
    assert not missing, "SuperBatch keywords missing from docs/configuration.md: " + ", ".join(
        missing
    )
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- (b) variables


def _string_literals(path: Path) -> Iterator[str]:
    """The string constants of a module, docstrings left out (they describe, not read)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node.value


def variables_in_source(*folders: Path) -> set[str]:
    """Every string literal of the folders' Python files that is a whole variable name."""
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            if path.resolve() == Path(__file__).resolve():
                continue
            names.update(s for s in _string_literals(path) if ENV_NAME.fullmatch(s))
    return names


def variables_the_code_reads() -> set[str]:
    from_env = {v for variables in BatchConfig.ENV_VARS.values() for v in variables}
    return from_env | variables_in_source(PACKAGE, *HARNESSES)


def credential_pattern() -> re.Pattern[str]:
    """Names of the credential variables' families (``BATCH_ACCOUNT_*``, ``AZURE_STORAGE_*``,
    ...), so that a misspelt credential variable in the docs is caught too."""
    prefixes = sorted(
        {
            "_".join(name.split("_")[:2]) + "_"
            for names in config._CREDENTIAL_ENV_VARS.values()
            for name in names
        }
    )
    return re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(prefixes) + r")[A-Z0-9_]*[A-Z0-9]")


def test_every_variable_the_docs_name_is_read_by_the_code() -> None:
    known = variables_the_code_reads()
    credentials = credential_pattern()
    unknown: list[str] = []
    for page in doc_pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            for name in [*ENV_NAME.findall(line), *credentials.findall(line)]:
                if name not in known:
                    unknown.append(f"{where(page, number)}: {name}")
    assert not unknown, "environment variables in docs/ that no code reads:\n" + "\n".join(unknown)


def test_the_variable_scan_sees_what_the_worker_and_bootstrap_read() -> None:
    """The scan finds the node-side variables, which are module constants, not fields."""
    from joblib_azurebatch import bootstrap, payload, retries

    found = variables_in_source(PACKAGE)
    for name in (
        payload.PAYLOAD_URL_ENV,
        payload.RESULT_URL_ENV,
        payload.SIGNING_KEY_ENV,
        bootstrap.BUNDLE_ENV,
        retries.RETRY_BUDGET_ENV,
    ):
        assert name in found


# --------------------------------------------------------------------------- (c) flags


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def flags_below(parser: argparse.ArgumentParser) -> set[str]:
    """The long options of a parser and of every subcommand under it."""
    flags = _options(parser)
    for child in _subcommands(parser).values():
        flags |= flags_below(child)
    return flags


def commands() -> dict[str, argparse.ArgumentParser]:
    found = _subcommands(build_parser())
    assert found, f"{PROG} has no subcommands"
    return found


def flag_pattern(flag: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])")


def test_every_flag_of_every_command_is_documented() -> None:
    missing: list[str] = []
    for name, parser in commands().items():
        pages = FLAG_PAGES.get(name, ("cli.md",))
        text = "\n".join((DOCS / page).read_text(encoding="utf-8") for page in pages)
        for flag in sorted(flags_below(parser)):
            if not flag_pattern(flag).search(text):
                missing.append(f"{PROG} {name} {flag} (looked in {', '.join(pages)})")
    assert not missing, "flags of the command that the docs never mention:\n" + "\n".join(missing)


#: The command where a shell would run it: at the start of the code (after a ``$`` prompt),
#: or after a backtick, ``;``, ``&&``, ``|`` or ``(``; not as a word of ``pip install``.
COMMAND_LINE = re.compile(
    rf"(?:^\s*(?:\$\s+)?|[`;&|(]\s*){re.escape(PROG)}[ \t]+([a-z][\w-]*)(.*)", re.MULTILINE
)


def written_commands(pages: list[Path]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``(where, words, flags)`` for each command line written as code in ``pages``: the
    subcommand words after ``joblib-azurebatch`` and the ``--flags`` up to a comment, a
    pipe or the end of the code."""
    for page in pages:
        for number, code in code_spans(page):
            for match in COMMAND_LINE.finditer(code):
                rest = re.split(r"\s#|[`|;&)]", match.group(2), maxsplit=1)[0]
                words = [match.group(1), *re.findall(r"(?<![\w-])[a-z][\w-]*", rest)[:1]]
                flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
                yield where(page, number), words, flags


def test_every_flag_written_next_to_a_command_exists() -> None:
    wrong: list[str] = []
    seen = 0
    for place, words, flags in written_commands(doc_pages()):
        parser = commands().get(words[0])
        if parser is None:
            wrong.append(f"{place}: {PROG} {words[0]}: no such command")
            continue
        seen += 1
        name = words[0]
        children = _subcommands(parser)
        if len(words) > 1 and words[1] in children:
            parser, name = children[words[1]], f"{name} {words[1]}"
        valid = flags_below(parser) | {"--help"}
        for flag in flags:
            if flag not in valid:
                wrong.append(
                    f"{place}: {PROG} {name} {flag}: no such option "
                    f"(it has {', '.join(sorted(valid))})"
                )
    assert seen, f"no `{PROG} COMMAND` written as code in docs/"
    assert not wrong, "command lines in docs/ that the parser refuses:\n" + "\n".join(wrong)


def test_the_command_scan_finds_what_a_reader_would_type(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `joblib-azurebatch jobs list --all` or `pip install joblib-azurebatch foo`.\n"
        "\n"
        "```bash\n"
        "$ joblib-azurebatch cleanup --dry-run --nope   # not --comment\n"
        "```\n",
        encoding="utf-8",
    )
    assert [(w, f) for _, w, f in written_commands([page])] == [
        (["cleanup"], ["--dry-run", "--nope"]),
        (["jobs", "list"], ["--all"]),
    ]


# --------------------------------------------------------------------------- (d) shell tabs

#: The content tabs every shell snippet comes in, one form per shell.
SHELL_TABS = ("bash", "PowerShell", "cmd")
SHELL_FENCE = re.compile(r"(`{3,}|~{3,})\s*(?:bash|sh|shell|console)\b")
TAB_HEADER = re.compile(r'===[+!]?\s+"([^"]*)"')


@dataclass(frozen=True)
class ShellSnippet:
    """A bash, sh, shell or console block: the content tab it sits in (``None`` outside
    any tab) and the titles of every tab of that tab's group."""

    place: str
    tab: str | None
    group: tuple[str, ...]


def shell_snippets(page: Path) -> list[ShellSnippet]:
    """Each shell block of ``page``. A block indented by N spaces belongs to the last
    ``=== "..."`` header indented by N - 4; a group is the run of headers at one
    indentation that no less indented line interrupts."""
    groups: list[list[str]] = []
    open_groups: dict[int, int] = {}  # indentation of the headers -> index in groups
    current: dict[int, str] = {}  # indentation of the headers -> title of the open tab
    found: list[tuple[int, str | None, int | None]] = []
    fence = ""
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.lstrip(" ")
        indent = len(line) - len(text)
        if fence:
            if text.startswith(fence) and not text.strip().strip(fence[0]):
                fence = ""
            continue
        if not text.strip():
            continue
        header = TAB_HEADER.match(text)
        for deeper in [i for i in open_groups if i > indent or (i == indent and not header)]:
            del open_groups[deeper]
            current.pop(deeper, None)
        if header:
            if indent not in open_groups:
                open_groups[indent] = len(groups)
                groups.append([])
            groups[open_groups[indent]].append(header.group(1))
            current[indent] = header.group(1)
            continue
        if SHELL_FENCE.match(text):
            outer = indent - 4
            found.append((number, current.get(outer), open_groups.get(outer)))
        if text.startswith(("```", "~~~")):
            fence = text[: len(text) - len(text.lstrip(text[0]))]
    return [
        ShellSnippet(where(page, number), tab, tuple(groups[group]) if group is not None else ())
        for number, tab, group in found
    ]


def test_every_shell_snippet_has_a_bash_a_powershell_and_a_cmd_form() -> None:
    wrong: list[str] = []
    seen = 0
    for page in doc_pages():
        for snippet in shell_snippets(page):
            seen += 1
            if snippet.tab is None:
                wrong.append(f"{snippet.place}: not inside a content tab")
            elif snippet.tab != "bash":
                wrong.append(f'{snippet.place}: inside the tab "{snippet.tab}", not "bash"')
            missing = [tab for tab in SHELL_TABS if tab not in snippet.group]
            if snippet.tab is not None and missing:
                wrong.append(
                    f"{snippet.place}: its tabs ({', '.join(snippet.group)}) lack "
                    + ", ".join(f'=== "{tab}"' for tab in missing)
                )
    assert seen, "no ```bash block in docs/"
    assert not wrong, (
        'shell snippets in docs/ without their === "bash", === "PowerShell" and === "cmd" '
        "tabs:\n" + "\n".join(wrong)
    )


def test_the_shell_tab_scan_sees_groups_and_strays(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "1. A step:\n"
        "\n"
        '    === "bash"\n'
        "\n"
        "        ```bash\n"
        "        ls\n"
        "        ```\n"
        "\n"
        '    === "PowerShell"\n'
        "\n"
        "        ```powershell\n"
        "        dir\n"
        "        ```\n"
        "\n"
        "        A note inside the tab.\n"
        "\n"
        '    === "cmd"\n'
        "\n"
        "        ```bat\n"
        "        dir\n"
        "        ```\n"
        "\n"
        "```sh\n"
        '=== "bash"\n'
        "```\n"
        "\n"
        '=== "bash"\n'
        "\n"
        "    ```console\n"
        "    $ ls\n"
        "    ```\n"
        "\n"
        "Prose ends the group.\n"
        "\n"
        '=== "cmd"\n'
        "\n"
        "    ```shell\n"
        "    dir\n"
        "    ```\n",
        encoding="utf-8",
    )
    assert [(s.place.rsplit(":", 1)[1], s.tab, s.group) for s in shell_snippets(page)] == [
        ("5", "bash", SHELL_TABS),
        ("23", None, ()),
        ("29", "bash", ("bash",)),
        ("37", "cmd", ("cmd",)),
    ]
