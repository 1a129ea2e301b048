"""Check the commands of shell blocks without running anything long.

Per command (backslash continuations joined, ``#`` comments dropped, ``$VAR`` expanded from the
block's own ``VAR=...`` lines):

* ``adarank ...`` / ``.venv/bin/adarank ...`` — parsed with :func:`adarank.cli.build_parser`;
  ``fit`` / ``validate`` of a recipe are then checked like ``adarank fit --print-config``
  (:func:`load_config` + :func:`validate_config`); ``recipes`` runs. A *synopsis* line (``[..]``,
  ``a|b``, ``<name>`` or upper-case placeholders such as ``RUN_DIR``) is checked for its
  sub-command and the ``--options`` it names;
* ``python scripts/X.py ...`` — the script's own argument parser accepts the arguments (its
  ``parse_args(argv)`` when it has one, else ``main(argv)`` stopped right after parsing), and any
  ``docs/...`` path it names exists;
* ``make TARGET VAR=value`` — the target and variables exist in the Makefile, ``RECIPE`` is a
  shipped recipe and the ``run`` target's ``ARGS`` validate as overrides of that recipe;
* ``pip install`` — the extras exist in pyproject.toml and a ``torch==X`` pin is the Makefile's;
* ``export VAR=...`` and ``VAR=...`` lines set variables.

In a plain fence (a table of commands) the text after a run of three or more spaces is a
description and is dropped.

Anything else fails: teach this module the command or mark the block with a skip directive.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from collections.abc import Callable, Mapping

from docs_blocks import ROOT

__all__ = ["check_shell_block", "logical_lines"]

_SYNOPSIS = re.compile(r"\[|\||\.\.\.|<\w+>|\b[A-Z][A-Z_]{2,}\b")
_ASSIGN = re.compile(r"^(?P<name>[A-Za-z_]\w*)=(?P<value>.*)$")


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined; blank and comment-only lines dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def _expand(line: str, env: Mapping[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise AssertionError(f"${name} is used but not set in the block")
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, line)


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=False)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def check_shell_block(
    text: str, placeholders: Mapping[str, str], *, plain: bool = False
) -> list[str]:
    """Check every command; returns one description per checked command.

    Args:
        text: the block.
        placeholders: words of the docs replaced before a real check (``/path/to/hf-model``).
        plain: a plain fence (a command table): text after a run of 3+ spaces is a description.

    Raises:
        AssertionError: a command that does not check out, with the reason.
    """
    env: dict[str, str] = {}
    done = []
    for raw in logical_lines(text):
        if plain:
            raw = re.split(r" {3,}", raw)[0]
        synopsis = bool(_SYNOPSIS.search(re.sub(r"#.*", "", raw)))
        words = _words(_expand(raw, env))
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        if all(_ASSIGN.match(w) for w in words):
            env.update(_ASSIGN.match(w).group("name", "value") for w in words)
            continue
        words = [placeholders.get(w, w) for w in words]
        words = [_sub_values(w, placeholders) for w in words]
        try:
            done.append(_dispatch(words, synopsis))
        except AssertionError as err:
            raise AssertionError(f"command `{raw}`: {err}") from None
    return done


def _sub_values(word: str, placeholders: Mapping[str, str]) -> str:
    key, eq, value = word.partition("=")
    return f"{key}={placeholders[value]}" if eq and value in placeholders else word


def _dispatch(words: list[str], synopsis: bool) -> str:
    cmd = words[0]
    if cmd in ("adarank", ".venv/bin/adarank"):
        return _check_adarank(words[1:], synopsis)
    if cmd in ("python", ".venv/bin/python", "python3") and words[1:2]:
        return _check_script(words[1], words[2:])
    if cmd == "make":
        return _check_make(words[1:])
    if cmd == "pip" and words[1:2] == ["install"]:
        return _check_pip(words[2:])
    raise AssertionError(f"unknown command {cmd!r} (teach tests/docs/docs_shell.py or skip)")


# ---------------------------------------------------------------- adarank
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"rejected by the argument parser: {err.getvalue().strip()}") from None


def _check_adarank(argv: list[str], synopsis: bool) -> str:
    from adarank.cli import build_parser, main

    parser = build_parser()
    subs = _subparsers(parser)
    if not argv or argv[0] not in subs:
        raise AssertionError(f"unknown sub-command {argv[:1]}; expected one of {sorted(subs)}")
    if synopsis:
        known = set(subs[argv[0]]._option_string_actions)
        flags = {w.strip("[]") for w in argv if w.strip("[]").startswith("--")}
        unknown = sorted(f.split("=")[0] for f in flags if f.split("=")[0] not in known)
        if unknown:
            raise AssertionError(f"`adarank {argv[0]}` has no option {unknown}")
        return f"synopsis adarank {argv[0]}"
    args = _parse(parser, argv)
    if args.command == "recipes":
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["recipes"]) == 0, "adarank recipes failed"
        return "ran adarank recipes"
    if args.command in ("fit", "validate") and getattr(args, "resume", None) is None:
        _validate_recipe(args.recipe, list(args.overrides))
        return f"validated adarank {args.command} {args.recipe}"
    return f"parsed adarank {args.command}"


def _validate_recipe(recipe: str, overrides: list[str]) -> None:
    from adarank.config import ConfigError, load_config, validate_config

    try:
        validate_config(load_config(recipe, overrides))
    except ConfigError as err:
        raise AssertionError(f"recipe {recipe} {overrides}: {err}") from None


# ---------------------------------------------------------------- scripts
class _Parsed(Exception):
    pass


def _check_script(script: str, argv: list[str]) -> str:
    path = ROOT / script
    if not (script.startswith("scripts/") and path.is_file()):
        raise AssertionError(f"{script}: no such script in the repository")
    missing = [w for w in argv if w.startswith("docs/") and not (ROOT / w).exists()]
    if missing:
        raise AssertionError(f"{script}: files named in the docs do not exist: {missing}")
    saved_path = list(sys.path)
    try:
        namespace = runpy.run_path(str(path), run_name=f"docs_check_{path.stem}")
        _run_parser(namespace, argv, script)
    finally:
        sys.path[:] = saved_path
    return f"parsed {script}"


def _run_parser(namespace: dict, argv: list[str], script: str) -> None:
    fn: Callable | None = namespace.get("parse_args")
    original = argparse.ArgumentParser.parse_args
    if fn is None:
        fn = namespace["main"]

        def parse_then_stop(self, args=None, ns=None):
            original(self, args, ns)
            raise _Parsed

        argparse.ArgumentParser.parse_args = parse_then_stop
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            fn(argv)
    except _Parsed:
        pass
    except SystemExit:
        raise AssertionError(f"{script} rejects {argv}: {err.getvalue().strip()}") from None
    finally:
        argparse.ArgumentParser.parse_args = original


# ---------------------------------------------------------------- make / pip
def _makefile() -> tuple[set[str], dict[str, str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))
    variables = dict(re.findall(r"^([A-Z_]+)[ \t]*[?:]?=[ \t]*(.*)$", text, re.M))
    return targets, {k: v.strip() for k, v in variables.items()}


def _check_make(argv: list[str]) -> str:
    from adarank.config import list_recipes

    targets, variables = _makefile()
    target = next((w for w in argv if "=" not in w), "run")
    if target not in targets:
        raise AssertionError(f"make: no target {target!r} in the Makefile")
    given = dict(w.split("=", 1) for w in argv if "=" in w)
    unknown = sorted(set(given) - set(variables))
    if unknown:
        raise AssertionError(f"make: the Makefile has no variable {unknown}")
    recipe = given.get("RECIPE", variables["RECIPE"])
    if recipe not in {name for name, _, _ in list_recipes()}:
        raise AssertionError(f"make RECIPE={recipe}: not a shipped recipe")
    if target == "run":
        _validate_recipe(recipe, shlex.split(given.get("ARGS", "")))
        return f"validated make run RECIPE={recipe}"
    return f"checked make {target}"


def _check_pip(argv: list[str]) -> str:
    text = (ROOT / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([A-Za-z][\w-]*)\s*=", section, re.M))
    _, variables = _makefile()
    for word in argv:
        if word.startswith("-") or word == ".":
            continue
        m = re.fullmatch(r"\.?\[(?P<extras>[\w,-]+)\]", word)
        if m:
            bad = sorted(set(m.group("extras").split(",")) - extras)
            if bad:
                raise AssertionError(f"pip: pyproject.toml has no extra {bad}")
        elif word.startswith("torch=="):
            pinned = variables["TORCH_SPEC"]
            if word != pinned:
                raise AssertionError(f"pip: {word} but the Makefile installs {pinned}")
    return "checked pip install"
