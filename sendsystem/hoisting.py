"""Hoisting: what a template prints the same for every recipient is rendered once.

Issue 17, direction 1. A newsletter is mostly constant (a ``{% set %}`` list of
articles rendered in a loop, static HTML, the list's name); only a few
expressions use the subscriber's fields. :func:`hoist` compiles a second
version of a template part in which the constant output is already literal
text, so a message runs only its recipient's expressions. The Merger
(merge.py) builds it once per newsletter, in the render child, under the same
CPU alarm as the compile and with the same sandboxed environment, caps and
output limit as a message; it keeps the template as written for the parts
where hoisting does not apply. ``[sorting] hoist_constants = false`` turns it
off (config.ini.example).

How: partial evaluation with Jinja itself, not with an evaluator of our own.

1. Each piece of the syntax tree that may depend on the recipient (a *unit*:
   one expression of an output, or a whole statement) is replaced by a marker
   (a private-use character, a 128-bit random token and the unit's number).
2. That tree (with the constant top-level ``{% set %}``s) is compiled by the
   same environment and rendered once with what is the same for every message
   of the newsletter: ``list`` and ``newsletter.id``. Jinja runs the loops,
   ifs, filters and autoescaping exactly as it does in a message.
3. The output is cut at the markers: the text between them becomes literal
   ``TemplateData`` (yielded as is by the compiled code), each marker becomes
   its unit again, in order. A loop over constant data is so unrolled: a unit
   inside it appears once per iteration, where the loop printed it.

What is constant (proved on the syntax tree; anything else is a unit):
literals; ``list`` and what is reached from it; ``newsletter.id`` (not
``newsletter`` itself nor ``.subject``, which is the recipient's subject); a
name bound by a top-level ``{% set x = <constant> %}`` that the template
assigns nowhere else (no other set, loop variable, macro or parameter), read
after that set; inside a loop over a constant sequence (not ``recursive``),
its variables and its ``loop``; operators, comparisons, attribute and item
access and method calls on constants; the filters and tests of
:data:`PURE_FILTERS` and :data:`PURE_TESTS` (no ``random``, no ``map``/
``select`` that pick a filter by name). Jinja's globals (``range``, ``dict``,
``cycler``, ``joiner``, ``namespace``) are not constants: a CSV column may be
named ``range`` and then replaces the global for that recipient.

What stays dynamic, and runs per message in its original order: every
expression that reads a recipient value (CSV fields, ``email``,
``unsubscribe_url``, ``subscriber``, ``newsletter.subject``, an undefined
name), macros and calls of them, call/filter/set blocks, namespaces,
``{% autoescape %}``, blocks, ifs on recipient values, loops over recipient
data, ``{% set %}``s of non-constant values. A unit may leave the loop or if
around it (be unrolled) only when it needs nothing from there: it reads no
loop variable and no ``loop``, reads only names the template never assigns or
constant sets (so Jinja's scoping cannot resolve a name differently at the top
level), and binds no name (no set, macro, block). Otherwise the whole loop or
if is one unit. A constant ``{% set %}`` is kept in the per-recipient template
where dynamic code still reads the name, at its place.

Why the output is byte-identical: the constant text is what Jinja printed for
those nodes, with the same environment, autoescaping (``Markup``), whitespace
and values; the units are the same nodes, run in the same order with the same
names in scope. tests/unit/test_hoisting.py checks it with hypothesis over
generated templates, on the demo newsletter and on the merge tests' templates.

A part is not hoisted (rendered as written, identical by construction) when
the constant render raises (an undefined name, a sandbox refusal, a cap, the
output limit, the CPU alarm: the messages then fail exactly as before); when
it took more than :data:`MAX_CPU` of CPU (near enough to the render limit that
hoisting could turn a timed-out message into a sent one); when its output
shows an object's address (``<built-in method ... at 0x...>`` differs between
two compiled copies); over :data:`MAX_CONSTANT_CHARS` of constant text or
:data:`MAX_SPLICED` units a message; or when nothing in it is constant.

Errors of a hoisted render: a message that fails with a template error is
rendered again as written (merge.py), so its reason is the plain render's.
Limit errors (CPU, memory, output cap) are not (the alarm has fired); the
output cap names the line the render was at, which can differ because the
constant text comes in bigger pieces.
"""

from __future__ import annotations

import copy
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes

# Filters and tests whose result depends on their arguments only: no randomness,
# no state, no filter or test chosen by name at render time.
PURE_FILTERS = frozenset({
    "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
    "escape", "filesizeformat", "first", "float", "forceescape", "format", "groupby",
    "indent", "int", "items", "join", "last", "length", "list", "lower", "max", "min",
    "replace", "reverse", "round", "safe", "slice", "sort", "string", "striptags", "sum",
    "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode", "wordcount",
    "wordwrap", "xmlattr",
})
PURE_TESTS = frozenset({
    "boolean", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false",
    "float", "ge", "greaterthan", "gt", "in", "integer", "iterable", "le", "lessthan",
    "lower", "lt", "mapping", "ne", "none", "number", "odd", "sameas", "sequence", "string",
    "true", "undefined", "upper", "==", "!=", "<", "<=", ">", ">=",
})
# A constant part that takes this much CPU is far from a newsletter (the demo's takes
# ~1 ms) and near enough to the render limit that hoisting could change which
# messages time out.
MAX_CPU = 0.05
MAX_CONSTANT_CHARS = 1_000_000
MAX_SPLICED = 10_000

# Expression nodes that are constant when all their children are.
_STRUCTURAL = (nodes.Const, nodes.TemplateData, nodes.Tuple, nodes.List, nodes.Dict,
               nodes.Pair, nodes.Keyword, nodes.CondExpr, nodes.BinExpr, nodes.UnaryExpr,
               nodes.Concat, nodes.Compare, nodes.Operand, nodes.Slice)
# What a unit moved out of a loop or if may be made of.
_MOVABLE = (nodes.Expr, nodes.Output, nodes.If, nodes.For, nodes.Keyword, nodes.Pair,
            nodes.Operand)
_NOT_MOVABLE = (nodes.NSRef, nodes.InternalName, nodes.ContextReference,
                nodes.DerivedContextReference, nodes.ImportedName, nodes.ExtensionAttribute,
                nodes.MarkSafe, nodes.MarkSafeIfAutoescape, nodes.EnvironmentAttribute)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

Render = Callable[[jinja2.Template, str, dict[str, Any]], str]


class NotHoisted(Exception):
    """Why a part is rendered as written (logged at debug level)."""


@dataclass(frozen=True)
class Hoisted:
    """A part's per-recipient template and what hoisting did to it."""

    template: jinja2.Template
    constant_chars: int   # literal text, a message
    units: int            # dynamic pieces run per message
    literals: tuple[str, ...] = ()   # the literal texts (their encoding is cached: merge.py)


@dataclass
class _Unit:
    node: nodes.Node
    kind: str             # "expr" (an output's child), "stmt", "set" (a constant top-level set)
    used: bool = False


def _target_names(target: nodes.Node) -> list[str] | None:
    """The names a loop binds, None for anything but names and tuples of them."""
    if isinstance(target, nodes.Name):
        return [target.name]
    if isinstance(target, nodes.Tuple):
        out: list[str] = []
        for item in target.items:
            names = _target_names(item)
            if names is None:
                return None
            out += names
        return out
    return None


def _free(node: nodes.Node, bound: frozenset[str]) -> set[str]:
    """Names ``node`` reads that are not bound inside it (loops bind theirs)."""
    if isinstance(node, nodes.Name):
        return {node.name} - bound if node.ctx == "load" else set()
    if isinstance(node, nodes.For):
        inner = bound | frozenset(_target_names(node.target) or ())
        out = _free(node.iter, bound)
        if node.test is not None:
            out |= _free(node.test, inner)
        for child in node.body:
            out |= _free(child, inner | {"loop"})
        for child in node.else_:
            out |= _free(child, bound)
        return out
    out = set()
    for child in node.iter_child_nodes():
        out |= _free(child, bound)
    return out


def _loads(items: Iterable[nodes.Node]) -> set[str]:
    names = set()
    for item in items:
        if isinstance(item, nodes.Name) and item.ctx == "load":
            names.add(item.name)
        names |= {n.name for n in item.find_all(nodes.Name) if n.ctx == "load"}
    return names


class _Folder:
    """One part's tree: the constant tree with markers, and the units."""

    def __init__(self, ast: nodes.Template, env: jinja2.Environment) -> None:
        self.env = env
        self.units: list[_Unit] = []
        self.token = secrets.token_hex(16)
        self.folded = 0   # constant expressions, loops, ifs and sets evaluated once
        assigned: Counter[str] = Counter(
            n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param"))
        assigned.update(m.name for m in ast.find_all(nodes.Macro))
        self.assigned = assigned

    def copy(self, node: nodes.Node) -> nodes.Node:
        return copy.deepcopy(node, {id(self.env): self.env})

    def marker(self, node: nodes.Node, kind: str) -> nodes.TemplateData:
        self.units.append(_Unit(node, kind))
        return nodes.TemplateData(f"\ue000{self.token}:{len(self.units) - 1}\ue001",
                                  lineno=node.lineno)

    # -- what is constant --------------------------------------------------------

    def _newsletter_id(self, node: nodes.Getattr | nodes.Getitem, consts: frozenset[str]) -> bool:
        inner = node.node
        if not (isinstance(inner, nodes.Name) and inner.name == "newsletter"
                and "newsletter" not in consts and self.assigned["newsletter"] == 0):
            return False
        if isinstance(node, nodes.Getattr):
            return node.attr == "id"
        return isinstance(node.arg, nodes.Const) and node.arg.value == "id"

    def const(self, node: nodes.Node, consts: frozenset[str]) -> bool:
        """Is ``node`` the same for every recipient (``consts``: names that are)?"""
        if isinstance(node, nodes.Name):
            return node.ctx == "load" and node.name in consts
        if isinstance(node, nodes.Getattr | nodes.Getitem):
            if node.ctx != "load":
                return False
            if self._newsletter_id(node, consts):
                return True
        elif isinstance(node, nodes.Filter):
            if node.name not in PURE_FILTERS or node.node is None:
                return False
        elif isinstance(node, nodes.Test):
            if node.name not in PURE_TESTS:
                return False
        elif isinstance(node, nodes.Call):
            if not isinstance(node.node, nodes.Getattr):   # a method, not range() or a macro
                return False
        elif not isinstance(node, _STRUCTURAL):
            return False
        return all(self.const(child, consts) for child in node.iter_child_nodes())

    def movable(self, node: nodes.Node, local: frozenset[str], consts: frozenset[str]) -> bool:
        """Does ``node`` run the same outside the loops and ifs around it?"""
        targets = {id(name) for loop in node.find_all(nodes.For)
                   for name in [loop.target, *loop.target.find_all(nodes.Name)]}
        if isinstance(node, nodes.For):
            targets |= {id(name) for name in [node.target, *node.target.find_all(nodes.Name)]}
        for sub in [node, *node.find_all(nodes.Node)]:
            if not isinstance(sub, _MOVABLE) or isinstance(sub, _NOT_MOVABLE):
                return False
            if isinstance(sub, nodes.Name) and sub.ctx != "load" and id(sub) not in targets:
                return False
        return all(name not in local and (name in consts or self.assigned[name] == 0)
                   for name in _free(node, frozenset()))

    # -- folding -----------------------------------------------------------------

    def top(self, ast: nodes.Template) -> list[nodes.Node]:
        """The constant tree of the whole part."""
        consts = {"list"} if self.assigned["list"] == 0 else set()
        out: list[nodes.Node] = []
        for node in ast.body:
            if (isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name)
                    and self.assigned[node.target.name] == 1 and node.target.name != "loop"
                    and self.const(node.node, frozenset(consts))):
                out.append(self.copy(node))
                out.append(nodes.Output([self.marker(node, "set")], lineno=node.lineno))
                consts.add(node.target.name)
                self.folded += 1
                continue
            folded = self.fold_one(node, frozenset(consts), frozenset(), nested=False)
            assert folded is not None  # at the top level anything can stay a unit
            out += folded
        return out

    def fold(self, body: list[nodes.Node], consts: frozenset[str], local: frozenset[str],
             ) -> list[nodes.Node] | None:
        out: list[nodes.Node] = []
        for node in body:
            folded = self.fold_one(node, consts, local, nested=True)
            if folded is None:
                return None
            out += folded
        return out

    def fold_one(self, node: nodes.Node, consts: frozenset[str], local: frozenset[str],
                 nested: bool) -> list[nodes.Node] | None:
        """``node`` with its units replaced by markers; None: it cannot leave its loop."""
        if isinstance(node, nodes.Output):
            children: list[nodes.Expr] = []
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    children.append(child)
                elif self.const(child, consts):
                    children.append(child)
                    self.folded += 1
                elif nested and not self.movable(child, local, consts):
                    return None
                else:
                    children.append(self.marker(child, "expr"))
            return [nodes.Output(children, lineno=node.lineno)]
        rolled: nodes.Node | None = None
        if isinstance(node, nodes.If):
            rolled = self.fold_if(node, consts, local)
        elif isinstance(node, nodes.For):
            rolled = self.fold_for(node, consts, local)
        if rolled is not None:
            self.folded += 1
            return [rolled]
        if nested and not self.movable(node, local, consts):
            return None
        return [nodes.Output([self.marker(node, "stmt")], lineno=node.lineno)]

    def fold_if(self, node: nodes.If, consts: frozenset[str], local: frozenset[str]
                ) -> nodes.If | None:
        if not self.const(node.test, consts):
            return None
        body = self.fold(node.body, consts, local)
        elifs: list[nodes.If] = []
        for elif_ in node.elif_:
            folded = self.fold_if(elif_, consts, local)
            if folded is None:
                return None
            elifs.append(folded)
        else_ = self.fold(node.else_, consts, local)
        if body is None or else_ is None:
            return None
        return nodes.If(node.test, body, elifs, else_, lineno=node.lineno)

    def fold_for(self, node: nodes.For, consts: frozenset[str], local: frozenset[str]
                 ) -> nodes.For | None:
        if node.recursive or not self.const(node.iter, consts):
            return None
        names = _target_names(node.target)
        if names is None or "loop" in names:
            return None
        bound = frozenset(names)
        if node.test is not None and not self.const(node.test, consts | bound):
            return None
        inner = local | bound | {"loop"}
        body = self.fold(node.body, consts | bound | {"loop"}, inner)
        else_ = self.fold(node.else_, consts, inner)
        if body is None or else_ is None:
            return None
        return nodes.For(node.target, node.iter, body, else_, node.test, False,
                         lineno=node.lineno)

    # -- splicing ----------------------------------------------------------------

    def splice(self, parts: list[str]) -> tuple[list[nodes.Node], int, int]:
        """The per-recipient tree from the constant render cut at its markers."""
        body: list[nodes.Node] = []
        run: list[nodes.Expr] = []
        sets: set[int] = set()
        chars = spliced = 0
        lineno = 1

        def flush() -> None:
            if run:
                body.append(nodes.Output(list(run), lineno=run[0].lineno))
                run.clear()

        for i, piece in enumerate(parts):
            if i % 2 == 0:
                if piece:
                    run.append(nodes.TemplateData(piece, lineno=lineno))
                    chars += len(piece)
                continue
            unit = self.units[int(piece)]
            node = self.copy(unit.node) if unit.used else unit.node
            unit.used = True
            lineno = node.lineno
            if unit.kind == "expr":
                assert isinstance(node, nodes.Expr)
                run.append(node)
                spliced += 1
                continue
            flush()
            body.append(node)
            if unit.kind == "set":
                sets.add(id(node))
            else:
                spliced += 1
        flush()
        # Constant sets stay where dynamic code still reads the name (and what they read).
        needed = _loads(n for n in body if id(n) not in sets)
        kept: set[int] = set()
        grew = True
        while grew:
            grew = False
            for n in body:
                if id(n) in sets and id(n) not in kept and isinstance(n, nodes.Assign) \
                        and isinstance(n.target, nodes.Name) and n.target.name in needed:
                    kept.add(id(n))
                    needed |= _loads([n.node])
                    grew = True
        merged: list[nodes.Node] = []
        for n in body:
            if id(n) in sets and id(n) not in kept:
                continue
            if isinstance(n, nodes.Output) and merged and isinstance(merged[-1], nodes.Output):
                merged[-1].nodes.extend(n.nodes)
            else:
                merged.append(n)
        return merged, chars, spliced


def _template(env: jinja2.Environment, part: str, body: list[nodes.Node]) -> jinja2.Template:
    tree = nodes.Template(body, lineno=1)
    tree.set_environment(env)
    code = env.compile(tree, name=part, filename=f"<{part} template>")
    return env.template_class.from_code(env, code, env.make_globals(None), None)


def hoist(env: jinja2.Environment, part: str, source: str, constants: Mapping[str, Any],
          render: Render) -> Hoisted:
    """The per-recipient template of one part; NotHoisted (or the render's error): use
    the template as written. ``constants``: ``list`` and ``newsletter`` (``id`` only);
    ``render``: merge.py's (the output limit). Run it under the render's CPU limit."""
    ast = env.parse(source, name=part)
    folder = _Folder(ast, env)
    tree = folder.top(ast)
    if folder.folded == 0:
        raise NotHoisted("nothing in it is the same for every recipient")
    evaluate = _template(env, part, tree)
    cpu = time.process_time()
    out = render(evaluate, part, dict(constants))
    cpu = time.process_time() - cpu
    if cpu > MAX_CPU:
        raise NotHoisted(f"its constant parts take {cpu:.3f} s of CPU")
    if _ADDRESS.search(out):
        raise NotHoisted("its output shows an object's address")
    parts = re.split("\ue000" + folder.token + r":(\d+)\ue001", out)
    if any(folder.token in text for text in parts[::2]):
        raise NotHoisted("a marker was cut")
    body, chars, spliced = folder.splice(parts)
    if chars > MAX_CONSTANT_CHARS or spliced > MAX_SPLICED:
        raise NotHoisted(f"{chars:,} constant characters, {spliced:,} units a message")
    literals = tuple(text for text in parts[::2] if text)
    return Hoisted(_template(env, part, body), chars, spliced, literals)
