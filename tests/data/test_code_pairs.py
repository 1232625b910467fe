"""Docstring -> code pairs derived from Python source (lmforge.data.code_pairs): the sft stage's default data and
the embedding retrieval task's pairs."""

import ast
import textwrap
from pathlib import Path

from lmforge.data.readers import stdlib_root
from lmforge.data.code_pairs import function_pairs, pairs_from_documents
from lmforge.finetune.code_pairs import completes_function, conversation

SOURCE = textwrap.dedent('''\
    import functools

    def top(a, b=1):
        """Add two numbers."""
        # the sum
        return a + b

    class Box:
        @functools.lru_cache(maxsize=None)
        def method(self,
                   x):
            """Multi-line
            docstring."""

            if x:
                return 1
            return 2

        def one_line(self): """Docstring on the def line."""; return 3

        def no_body(self):
            """Only a docstring."""

        def undocumented(self):
            return 4

        def flush_string(self):
            """Has a string flush with the margin."""
            s = """
    not indented"""
            return s
    ''')


def test_pairs_cut_prompt_and_body_by_lines():
    pairs = list(function_pairs(SOURCE, "m.py"))
    assert [p.id for p in pairs] == ["m.py:3:top", "m.py:10:Box.method"]
    top, method = pairs
    assert top.prompt == 'def top(a, b=1):\n    """Add two numbers."""'
    assert top.body == "    # the sum\n    return a + b"
    # Decorators belong to the prompt; the def's own indentation is removed; the blank line after the docstring
    # belongs to neither side.
    assert method.prompt == ('@functools.lru_cache(maxsize=None)\ndef method(self,\n           x):\n'
                             '    """Multi-line\n    docstring."""')
    assert method.body == "    if x:\n        return 1\n    return 2"
    for p in pairs:
        assert completes_function(p.prompt, p.body)
        conv = conversation(p)
        assert [m.role for m in conv] == ["user", "assistant"] and conv[1].content == p.body


def test_completes_function_rejects_cut_bodies():
    prompt = 'def f(x):\n    """Double."""'
    assert completes_function(prompt, "    return 2 * x")
    assert not completes_function(prompt, "    if x:\n")  # ran out before the block's body
    assert not completes_function(prompt, "return (x")
    assert not completes_function(prompt, "")  # a docstring-only function parses, but nothing was written
    assert not completes_function(prompt, "    return x\nprint(1)")  # ran on past the function


def test_real_stdlib_modules_round_trip():
    """On real files, prompt + body is exactly the function's source lines (dedented), and every pair parses."""
    root = stdlib_root()
    docs = [(rel, (root / rel).read_text(encoding="utf-8")) for rel in ("json/decoder.py", "textwrap.py", "shlex.py")]
    seen: set[str] = set()
    pairs, bad = pairs_from_documents(docs, seen)
    assert bad == 0 and len(pairs) >= 15 and len(seen) == len(pairs)
    for pair in pairs:
        assert completes_function(pair.prompt, pair.body), pair.id
        rel, line, qualname = pair.id.split(":")
        tree = ast.parse(dict(docs)[rel])
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.lineno == int(line))
        assert node.name == qualname.split(".")[-1]
        assert pair.prompt == pair.signature + "\n" + pair.docstring and pair.code == pair.signature + "\n" + pair.body
        assert pair.summary == " ".join(ast.get_docstring(node).split("\n\n")[0].split())
        rebuilt = ast.parse(pair.prompt + "\n" + pair.body).body[0]
        # The same function, statement for statement; only the docstring's inner indentation moved with the dedent.
        assert ast.get_docstring(rebuilt) == ast.get_docstring(node)
        assert [ast.dump(s) for s in rebuilt.body[1:]] == [ast.dump(s) for s in _without_position(node).body[1:]]
        assert ast.dump(rebuilt.args) == ast.dump(_without_position(node).args)
    # a second pass shares `seen`, so nothing repeats
    again, _ = pairs_from_documents(docs, seen)
    assert again == []


def _without_position(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node)).body[0]


def test_unparsable_files_are_counted_not_fatal(tmp_path: Path):
    pairs, bad = pairs_from_documents([("py2.py", "print 'hello'\n"), ("nul.py", "x = 1\x00"), ("m.py", SOURCE)])
    assert bad == 2 and len(pairs) == 2


PARTS = textwrap.dedent('''\
    class Outer:
        def method(self, x):
            """Return twice x, for the
            given x.

            Longer text that is not the summary.
            """

            return 2 * x

    def outer():
        def inner(y):
            """Nested functions count too."""
            return y
        return inner
    ''')


def test_pair_parts_signature_docstring_body_summary_and_code():
    method, inner = list(function_pairs(PARTS, "p.py"))
    assert (method.id, inner.id) == ("p.py:2:Outer.method", "p.py:12:outer.inner")
    assert method.signature == "def method(self, x):"
    assert method.docstring == '    """Return twice x, for the\n    given x.\n\n    Longer text that is not the summary.\n    """'
    assert method.body == "    return 2 * x"  # the blank line after the docstring belongs to neither side
    assert method.summary == "Return twice x, for the given x."
    assert method.code == "def method(self, x):\n    return 2 * x"  # the function without its docstring
    assert inner.prompt == 'def inner(y):\n    """Nested functions count too."""'
