"""What a ``.pt2`` program would turn into code, proven plain data by whitelist parsers.

``torch.export.load`` (torch 2.13, ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``) and ``ExportedProgram.module()`` turn these parts of an
archive into code; each is checked here, and whatever is not proven plain is a hazard:

- ``guards_code`` strings are pasted into a function and ``exec``'d by ``.module()``
  (``torch/export/_unlift.py``): each must parse as a size guard (sizes of ``L[...]`` inputs,
  integers, arithmetic, comparisons, ``max``/``min``).
- every ``expr_str`` (sym ints, floats and bools in sizes, strides and values) goes through
  ``sympy.sympify``, which ``eval``s it: each must parse as sympy constructors from a fixed
  set applied to integers and ``Symbol('s0', ...)``-style names.
- names (inputs, nodes, parameters, buffers, ``forward_arg_names``, kwargs) are pasted into
  the Python source FX generates and ``exec``s for the module: each must be a dotted identifier.
- node targets are resolved by ``getattr`` on ``torch``/``operator``/``math``: each must name
  an operator (``torch.ops.*``) or one of the few functions torch's verifier accepts.
- ``data/aotinductor/`` holds shared libraries that are loaded: always a hazard.
- a zip with two entries of one name (ignoring case, as torch's reader does): torch and
  Python's ``zipfile`` may read different copies.

Which members are programs is never decided by name: every member whose bytes start a JSON
object is checked as one. Pickled payloads (weights, constants, opaque objects, sample inputs)
are not decided here either: the scanner walks every member as a potential pickle.
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from ..errors import ResourceLimitError

_MAX_TEXT = 100_000  # one expression or guard
_CHUNK = 1 << 16
_JSON_SPACE = b" \t\r\n"
_MAX_INT = 2**64
_MAX_POW_EXPONENT = 64

# Dotted names of word characters (``conv1.weight``, ``0.bias``): no quote, bracket, space or
# operator can reach the code FX generates from them.
_IDENTIFIER_PATH = re.compile(r"^(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?$", re.ASCII)
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}[0-9]+$")
_FLOAT_TEXT = re.compile(r"^-?[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?$")
_NATIVE = re.compile(r"(?:^|/)data/aotinductor/", re.IGNORECASE)
_PROGRAM_PATH = re.compile(r"(?:^|/)(?:models/|serialized_exported_program\.json$)")

# Keys whose string values torch only stores, splits, repr()s or json-parses (never code): string
# constants, and what ``deserialize_metadata`` reads from a node's metadata.
_FREE_TEXT_KEYS = frozenset(
    {
        "as_string", "as_strings", "torch_version", "stack_trace", "nn_module_stack",
        "source_fn_stack", "torch_fn", "custom", "from_node",
    }
)  # fmt: skip
# Pytree specs (JSON in a string): FX pastes their dict keys into generated code.
_TREESPEC_KEYS = frozenset({"in_spec", "out_spec"})
_TREESPEC_FIELDS = frozenset({"type", "context", "children_spec"})
_RANGE_KEYS = "range_constraints"

# sympy constructors (and torch.utils._sympy.functions) a serialized shape expression may call.
_SYMPY_CALLS = frozenset(
    {
        "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not",
        "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
        "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
        "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False", "int_oo"})
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
_SYMBOL_ASSUMPTIONS = frozenset(
    {
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
        "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative", "extended_real",
    }
)  # fmt: skip
_GUARD_FUNCTIONS = frozenset({"max", "min", "abs", "int", "float"})
_GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt"})
_SIZE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_BINARY = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_UNARY = (ast.USub, ast.UAdd, ast.Not)

# Targets torch's verifier accepts besides ``torch.ops.*`` (torch/_export/verifier.py).
_OPERATOR_NAMES = frozenset(
    {
        "getitem", "add", "mul", "sub", "truediv", "ge", "le", "gt", "lt", "eq", "ne",
        "floordiv", "mod", "and_", "or_", "not_", "pow", "neg", "abs", "lshift", "rshift",
    }
)  # fmt: skip
_TORCH_FUNCTIONS = frozenset(
    {
        "torch.autograd.grad_mode.set_grad_enabled", "torch.sym_int", "torch.sym_float",
        "torch.sym_ite", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sqrt",
        "torch.sym_sum", "torch._C._set_grad_enabled", "torch.amp.autocast_mode._enter_autocast",
        "torch.amp.autocast_mode._exit_autocast", "builtins.round", "math.ceil", "math.floor",
        "math.trunc",
        "torch.fx.experimental.symbolic_shapes.cast_symbool_to_symint_guardless",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Hazard:
    """One part of a program that loading it would turn into code, or could not be proven plain.

    Attributes:
        name: what was found (the offending text, shortened, or the member name).
        where: the member (and JSON field) it is in.
        reason: why loading it would run code.
    """

    name: str
    where: str
    reason: str


def archive_hazards(infos: Iterable[zipfile.ZipInfo], label: str) -> Iterator[Hazard]:
    """Hazards of a zip's directory: duplicate entry names and AOTInductor native code.

    Names are compared ignoring case: torch's reader (miniz) looks names up case-insensitively
    by binary search, so which of two such entries it reads is arbitrary.
    """
    counts = Counter(info.filename.lower() for info in infos)
    for info in infos:
        name = info.filename
        if counts[name.lower()] > 1:
            yield Hazard(
                label + name,
                label + name,
                f"the zip holds {counts[name.lower()]} entries named {name!r} (ignoring case): "
                "torch and the scanner may read different copies",
            )
        if _NATIVE.search(name):
            yield Hazard(label + name, label + name, "AOTInductor native code is loaded")


def member_hazards(stream: IO[bytes], member: str, max_bytes: int) -> Iterator[Hazard]:
    """Hazards of one member, if it holds a JSON object (a program, a payload config or other).

    Any member may: torch parses a program by name, so the check goes by content. Leading JSON
    whitespace is skipped however long; a member whose first other byte is not ``{`` is no JSON
    object and no program torch could load. The rest is decoded the way torch does (strict
    UTF-8, then ``json.loads``). A member under ``models/`` (or a legacy
    ``serialized_exported_program.json``) that cannot be parsed is a hazard.

    Raises:
        ResourceLimitError: the JSON object (with its leading whitespace) exceeds ``max_bytes``.
    """
    skipped = 0
    chunk = stream.read(_CHUNK)
    while chunk and not chunk.lstrip(_JSON_SPACE):
        skipped += len(chunk)
        chunk = stream.read(_CHUNK)
    chunk = chunk.lstrip(_JSON_SPACE)
    if chunk[:1] != b"{":
        return
    data = chunk + stream.read(max(0, max_bytes + 1 - skipped - len(chunk)))
    if skipped + len(data) > max_bytes:
        raise ResourceLimitError(
            f"{member} holds a JSON object of more than {max_bytes:,} bytes, more than "
            "torchkeep parses from an untrusted archive; a program of that size is not checked"
        )
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        if _PROGRAM_PATH.search(member):
            yield Hazard(member, member, "unreadable program JSON")
        return
    yield from _document_hazards(document, member)


def _document_hazards(document: object, member: str) -> Iterator[Hazard]:
    """Walk a JSON document (iteratively) and check every value torch could turn into code.

    Nothing is skipped: a key decides how a string directly under it is checked, never whether
    what lies below is looked at (a node may be *named* ``metadata``).
    """
    stack: list[tuple[str, object, str]] = [("", document, member)]
    while stack:
        key, value, where = stack.pop()
        if key == "guards_code":
            yield from _text_hazards(value, where, is_plain_guard, "a guard .module() execs")
        elif key == "expr_str":
            yield from _text_hazards(value, where, is_plain_expression, "sympify evaluates it")
        elif key in _TREESPEC_KEYS:
            yield from _text_hazards(value, where, is_plain_treespec, "FX pastes its keys in code")
        elif key in ("target", "as_operator") and isinstance(value, str):
            if not is_known_operator(value):
                yield _hazard(value, where, "a node target that is not a known operator")
        elif isinstance(value, dict):
            for name, item in value.items():
                if key == _RANGE_KEYS:
                    if not is_plain_expression(name):
                        yield _hazard(name, where, "a range constraint on a non-symbol")
                elif not _IDENTIFIER_PATH.match(name):
                    yield _hazard(name, where, "a name FX pastes into generated code")
                stack.append((name if key != _RANGE_KEYS else "", item, f"{where}:{name}"))
        elif isinstance(value, list):
            stack.extend((key, item, where) for item in value)
        elif isinstance(value, str) and not (
            key in _FREE_TEXT_KEYS or _IDENTIFIER_PATH.match(value)
        ):
            yield _hazard(value, f"{where}:{key}", "a name FX pastes into generated code")


def _text_hazards(
    value: object, where: str, check: Callable[[str], bool], what: str
) -> Iterator[Hazard]:
    """Each string of ``value`` (one or a list; ``None`` is absent) must pass ``check``."""
    texts = value if isinstance(value, list) else [] if value is None else [value]
    for text in texts:
        if not (isinstance(text, str) and check(text)):
            yield _hazard(str(text), where, f"not plain data: {what} (runs Python)")


def _hazard(text: str, where: str, reason: str) -> Hazard:
    shown = text if len(text) < 80 else text[:77] + "..."
    return Hazard(shown, where, reason)


def is_known_operator(target: str) -> bool:
    """True for ``torch.ops.<ns>.<op>[.<overload>]`` and the functions torch's verifier allows."""
    if not _IDENTIFIER_PATH.match(target) or not target:
        return False
    if target.startswith("torch.ops.") and 3 <= target.count(".") <= 4:
        return True
    module, _, name = target.rpartition(".")
    return (module == "_operator" and name in _OPERATOR_NAMES) or target in _TORCH_FUNCTIONS


def is_plain_treespec(text: str) -> bool:
    """True when ``text`` is a serialized pytree spec whose types, keys and names are plain.

    A spec is ``[protocol, node]``; a node holds a ``type`` (a dotted name or null), a
    ``context`` (JSON text: null, or identifiers, integers and booleans, possibly in a list) and
    ``children_spec`` (nodes).
    """
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not (isinstance(spec, list) and len(spec) == 2 and type(spec[0]) is int):
        return False
    nodes = [spec[1]]
    while nodes:
        node = nodes.pop()
        if not (isinstance(node, dict) and set(node) <= _TREESPEC_FIELDS):
            return False
        kind, context, children = node.get("type"), node.get("context"), node.get("children_spec")
        if not (kind is None or (isinstance(kind, str) and _IDENTIFIER_PATH.match(kind))):
            return False
        if not (context is None or (isinstance(context, str) and _plain_context(context))):
            return False
        if not isinstance(children, list):
            return False
        nodes.extend(children)
    return True


def _plain_context(text: str) -> bool:
    try:
        context = json.loads(text)
    except (ValueError, RecursionError):
        return False
    items = context if isinstance(context, list) else [context]
    return all(
        item is None
        or type(item) in (int, bool)
        or (isinstance(item, str) and _IDENTIFIER_PATH.match(item) is not None)
        for item in items
    )


def _parse(text: str) -> ast.expr | None:
    if len(text) > _MAX_TEXT:
        return None
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _small_int(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return (
        isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= _MAX_INT
    )


def is_plain_expression(text: str) -> bool:
    """True when ``text`` is a shape expression sympify can evaluate without running code.

    Accepted: integer and float literals, symbol names like ``s0``/``u3``, ``Symbol('s0',
    positive=True, integer=True)``, calls of sympy/torch shape functions from a fixed set,
    ``+ - * / // % **``, unary minus and comparisons. A power or left shift needs an integer
    literal exponent of at most 64 and no power in its base, so no expression (with any hint
    substituted for its symbols) makes sympy or torch compute a huge number.
    """
    node = _parse(text)
    return node is not None and _plain_expression(node)


def _plain_expression(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, bool) and (
            type(node.value) is not int or abs(node.value) <= _MAX_INT
        )
    if isinstance(node, ast.Name):
        return bool(_SYMBOL_NAME.match(node.id)) or node.id in _SYMPY_CONSTANTS
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _UNARY) and _plain_expression(node.operand)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow) and not _bounded_power(node.left, node.right):
            return False
        return (
            isinstance(node.op, _BINARY)
            and _plain_expression(node.left)
            and _plain_expression(node.right)
        )
    if isinstance(node, ast.Compare):
        return all(isinstance(op, _COMPARE) for op in node.ops) and all(
            _plain_expression(part) for part in (node.left, *node.comparators)
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _plain_call(node, node.func.id)
    return False


def _plain_call(node: ast.Call, name: str) -> bool:
    if name == "Symbol":
        return (
            len(node.args) == 1
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and bool(_SYMBOL_NAME.match(node.args[0].value))
            and all(
                k.arg in _SYMBOL_ASSUMPTIONS
                and isinstance(k.value, ast.Constant)
                and type(k.value.value) is bool
                for k in node.keywords
            )
        )
    if name == "Float":
        return (
            len(node.args) == 1
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and bool(_FLOAT_TEXT.match(node.args[0].value))
            and all(k.arg == "precision" and _small_int(k.value) for k in node.keywords)
        )
    if name not in _SYMPY_CALLS or node.keywords:
        return False
    if name in _POW_CALLS and (len(node.args) != 2 or not _bounded_power(*node.args)):
        return False
    return all(_plain_expression(arg) for arg in node.args)


def _bounded_power(base: ast.expr, exponent: ast.expr) -> bool:
    """A power (or shift) whose exponent is an integer literal of at most 64, with no power in
    its base: torch substitutes hints (any size) for symbols, so nothing else stays small."""
    literal = _integer_literal(exponent)
    return (
        literal is not None
        and abs(literal) <= _MAX_POW_EXPONENT
        and not any(_is_power(n) for n in ast.walk(base))
    )


def _is_power(node: ast.AST) -> bool:
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)) or (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _POW_CALLS
    )


def _integer_literal(node: ast.expr) -> int | None:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Integer"
        and len(node.args) == 1
    ):
        node = node.args[0]
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -1, node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def is_plain_guard(text: str) -> bool:
    """True when ``text`` is a size guard ``.module()`` can exec without running other code.

    Accepted: number literals; inputs ``L['x']`` themselves; ``L['x'].size()[0]``-style
    accesses (``size``, ``stride``, ``storage_offset``, ``dim``, ``numel`` of inputs reached by
    identifier or integer keys);
    ``+ - * / // % **``; comparisons; ``and``/``or``/``not``; ``max``/``min``/``abs``/``int``/
    ``float`` and ``math.floor``/``ceil``/``trunc``/``sqrt`` calls.
    """
    node = _parse(text)
    return node is not None and _plain_guard(node)


def _plain_guard(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, bool, float) and _small_int_or_bool(node.value)
    if isinstance(node, ast.BoolOp):
        return all(_plain_guard(value) for value in node.values)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _UNARY) and _plain_guard(node.operand)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow) and not _bounded_power(node.left, node.right):
            return False
        return isinstance(node.op, _BINARY) and _plain_guard(node.left) and _plain_guard(node.right)
    if isinstance(node, ast.Compare):
        return all(isinstance(op, _COMPARE) for op in node.ops) and all(
            _plain_guard(part) for part in (node.left, *node.comparators)
        )
    if isinstance(node, ast.Subscript):
        return (_small_int(node.slice) and _size_access(node.value)) or _input_source(node)
    if isinstance(node, ast.Call) and not node.keywords:
        if not all(_plain_guard(arg) for arg in node.args):
            return False
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in _GUARD_FUNCTIONS
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return func.value.id == "math" and func.attr in _GUARD_MATH
        return _size_access(node)
    return False


def _small_int_or_bool(value: object) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or abs(value) <= _MAX_INT


def _size_access(node: ast.expr) -> bool:
    """``L[...].size()`` (and the other size methods) on an input source, with no arguments."""
    return (
        isinstance(node, ast.Call)
        and not node.args
        and not node.keywords
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _SIZE_METHODS
        and _input_source(node.func.value)
    )


def _input_source(node: ast.expr) -> bool:
    """``L['x']``, ``L['x']['k']``, ``L['args'][0]``: inputs reached by plain keys."""
    while isinstance(node, ast.Subscript):
        key = node.slice
        plain = isinstance(key, ast.Constant) and (
            (isinstance(key.value, str) and key.value.isidentifier()) or _small_int(key)
        )
        if not plain:
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def is_program_member(name: str) -> bool:
    """True for a member torch reads as an exported program (``models/*.json``, legacy JSON)."""
    return bool(_PROGRAM_PATH.search(name)) and name.endswith(".json")


def pytree_types(data: bytes) -> set[str]:
    """The serialized type names the pytree specs of a program's JSON name (``in_spec``,
    ``out_spec``), e.g. ``transformers.modeling_outputs.CausalLMOutputWithPast``.

    ``torch.export.load`` looks each one up in the running process's pytree registry (it never
    imports one); a caller checks them there first to name a missing one. Unparseable JSON or
    specs give no names (the scan judges those).
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return set()
    found: set[str] = set()
    stack: list[tuple[str, object]] = [("", document)]
    while stack:
        key, value = stack.pop()
        if key in _TREESPEC_KEYS and isinstance(value, str):
            found |= _spec_types(value)
        elif isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, item) for item in value)
    return found


def _spec_types(text: str) -> set[str]:
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return set()
    nodes = [spec[1]] if isinstance(spec, list) and len(spec) == 2 else []
    found = set()
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        children = node.get("children_spec")
        nodes.extend(children if isinstance(children, list) else [])
    return found
