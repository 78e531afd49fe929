"""The malformed-recipe corpus: every broken recipe gets exit 2 from `validate` and `train`, a message naming its field,
node or file, and no traceback.

Each case is a file in tests/malformed/recipes/: a small variant of a shipped recipe with one thing wrong. Its first
line is `# expect: TEXT` (what the message must contain: the field path, node or file), and an optional second line
`# overrides: a.b=c d.e=f` gives command-line overrides. Recipes that are not text at all are made here in code.
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO

from mmadapt.cli import main

CASES = sorted((REPO / "tests" / "malformed" / "recipes").glob("*.yaml"))
TINY = REPO / "recipes" / "tiny" / "qformer-random.yaml"


def header(path: Path) -> tuple[str, list[str]]:
    """(expected message text, overrides) from a case file's first two comment lines."""
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("# expect: "), f"{path.name}: the first line must be '# expect: TEXT'"
    overrides = shlex.split(lines[1].removeprefix("# overrides:")) if len(lines) > 1 and lines[1].startswith("# overrides:") else []
    return lines[0].removeprefix("# expect: ").strip(), overrides


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process; assert exit 2 with a message and no traceback; return what it printed."""
    for logger in logging.root.manager.loggerDict.values():  # libraries' own handlers (transformers') likewise
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old stream, which pytest has closed
    code = main(list(argv))
    out, err = capsys.readouterr()
    printed = out + err
    assert code == 2, f"exit {code}, expected 2:\n{printed[-2000:]}"
    assert "Traceback" not in printed and "unexpected" not in printed, printed[-2000:]
    return printed


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) + len(NOT_TEXT) >= 60, f"{len(CASES)} recipe files + {len(NOT_TEXT)} in code"


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_a_malformed_recipe_is_refused_by_validate_and_train(case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected, overrides = header(case)
    for command in ("validate", "train"):
        printed = refused(capsys, command, str(case), *overrides)
        assert expected in printed, f"{command}: {expected!r} not in:\n{printed[-2000:]}"


NOT_TEXT = {
    "binary": bytes(range(256)) * 4,
    "utf-16": "graph:\n  llm: {type: causal_lm}\n".encode("utf-16"),
    "latin-1": "name: caf\xe9\ngraph: {}\n".encode("latin-1"),
}


@pytest.mark.parametrize("kind", NOT_TEXT)
def test_a_recipe_that_is_not_utf8_text_names_its_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(NOT_TEXT[kind])
    for command in ("validate", "train"):
        assert str(path) in refused(capsys, command, str(path))


@pytest.mark.parametrize("override", ["train.lr={", "train.lr=[1, 2", "graph.qformer.num_queries=: :", "train.steps"])
def test_a_malformed_override_names_itself(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    key = override.partition("=")[0]
    for command in ("validate", "train"):
        assert key in refused(capsys, command, str(TINY), override)


def test_a_key_written_twice_names_the_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = TINY.read_text().replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 5.0e-2\n")
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    line = text.splitlines().index("  lr: 5.0e-2") + 1
    printed = refused(capsys, "validate", str(path))
    assert str(path) in printed and f"line {line}" in printed and "'lr'" in printed, printed
