"""The docs against the code: flag tables equal to the parsers, links that resolve, commands that parse,
run-llama.sh's variables documented. Each failure says what to fix."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from llama_ft import docs_flags
from llama_ft.cli import COMMANDS
from llama_ft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- flag tables ---------------------------------------------------------------------------------------------


def test_every_command_has_a_parser_for_the_docs():
    assert set(docs_flags.PARSERS) == set(COMMANDS), "llama_ft/docs_flags.py PARSERS must list every llama-ft command"


def test_flag_tables_match_the_parsers():
    problems = docs_flags.check()
    assert not problems, "\n".join(problems)


def _toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft toy")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank | a pipe")
    p.add_argument("--fast", action="store_true", help="go fast")
    return p


def test_a_flag_missing_from_the_docs_fails_and_write_fixes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_flags, "DOCS_DIR", tmp_path)
    monkeypatch.setattr(docs_flags, "PARSERS", {"toy": "unused"})
    monkeypatch.setattr(docs_flags, "parser_for", lambda cmd: _toy_parser())
    table = docs_flags.render("toy")
    assert "| `--lora_r N` | `64` | LoRA rank \\| a pipe |" in table
    assert "| `--fast` |  | go fast |" in table
    doc = tmp_path / "toy.md"
    stale = "\n".join(line for line in table.splitlines() if "--fast" not in line) + "\n"
    doc.write_text(f"# Toy\n\n<!-- flags:toy -->\n{stale}<!-- /flags:toy -->\n\nafter\n")
    (problem,) = docs_flags.check()
    assert "toy.md" in problem and "llama-ft toy" in problem and docs_flags.WRITE_COMMAND in problem
    assert docs_flags.write() == [doc]
    assert docs_flags.check() == []
    assert doc.read_text() == f"# Toy\n\n<!-- flags:toy -->\n{table}<!-- /flags:toy -->\n\nafter\n"


def test_a_command_without_a_table_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_flags, "DOCS_DIR", tmp_path)
    monkeypatch.setattr(docs_flags, "PARSERS", {"toy": "unused"})
    (tmp_path / "toy.md").write_text("# Toy\n")
    (problem,) = docs_flags.check()
    assert "llama-ft toy: expected one flags table" in problem and "<!-- flags:toy -->" in problem


def test_defaults_do_not_depend_on_the_checkout():
    assert docs_flags._value(str(docs_flags.PACKAGE_PARENT / "llama_ft" / "assets" / "x.jsonl")) == \
        "llama_ft/assets/x.jsonl"
    assert docs_flags._value(["q_proj", "v_proj"]) == "q_proj v_proj"
    assert docs_flags._value(True) == "true"


# --- links ---------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m[1])
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}:\n" + "\n".join(bad)


# --- commands in the docs --------------------------------------------------------------------------------------


def _parser(program: list[str]) -> argparse.ArgumentParser | None:
    """The parser of a documented command line's program, or None for programs the docs only mention."""
    if program[0] == "llama-ft" and len(program) > 1:
        if program[1] == "hostfile":
            from llama_ft.hostfile import build_parser

            return build_parser()
        return docs_flags.parser_for(program[1]) if program[1] in docs_flags.PARSERS else None
    if program[0] == "bash" and len(program) > 1 and program[1].endswith("run-llama.sh"):
        return docs_flags.parser_for("train")
    if program[0].startswith("python") and len(program) > 1 and program[1].endswith("apply_ds_adapters.py"):
        return docs_flags.parser_for("merge")
    return None


def _command_lines(page: Path) -> list[list[str]]:
    """Every simple command of the page's bash blocks, as words: continuations joined, comments and leading
    VAR=value assignments dropped, lists split at && ; ||."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for w in [*words, "&&"]:
                if w in ("&&", ";", "||", "|"):
                    while command and re.match(r"[A-Z_][A-Z0-9_]*=", command[0]):
                        command.pop(0)
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(w)
    return out


def _arguments(words: list[str]) -> list[str]:
    args = words[2:]
    if words[0] == "bash":
        args = [a for a in args if a != "--force"]  # run-llama.sh's own flag, not passed to training
    if words[:2] == ["llama-ft", "plan"] and "--" in args:
        args = args[:args.index("--")]
    return args


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_documented_commands_parse(page):
    bad = []
    for words in _command_lines(page):
        parser = _parser(words)
        if parser is None:
            continue
        args = _arguments(words)
        if "--config" in args and not any("--config" in a.option_strings for a in parser._actions):
            continue  # documented ahead of the flag (docs/training.md); checked once the parser has it
        try:
            parser.parse_args(args)
        except UserError as e:
            bad.append(f"{shlex.join(words)}\n    -> {e}")
        except SystemExit:
            bad.append(f"{shlex.join(words)}\n    -> refused (argparse's message is in the captured stderr)")
    assert not bad, f"{_rel(page)}: commands that their parser refuses:\n" + "\n".join(bad)


def test_the_readme_keeps_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in (ROOT / "README.md").read_text(), "README's test command must be .ci/run's"


# --- run-llama.sh's environment ----------------------------------------------------------------------------------


def test_run_llama_variables_are_documented():
    header = (ROOT / "run-llama.sh").read_text().split("set -euo pipefail")[0]
    names = set()
    for m in re.finditer(r"^#   ([A-Z][A-Z0-9_]*(?: / [A-Z][A-Z0-9_]*)*)\s", header, re.MULTILINE):
        names.update(m[1].split(" / "))
    assert {"MODEL", "DATA", "OUTPUT_DIR", "HOSTFILE", "DS_CONFIG", "NPROC", "MERGE_DIR"} <= names
    table = (ROOT / "docs" / "training.md").read_text().split("### Environment")[1].split("\n#")[0]
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"docs/training.md's Environment table lacks run-llama.sh's {', '.join(missing)}"
