"""DIRAC ClassAd-light JDL: parse, render and validate job descriptions.

DIRAC and DiracX describe a job as a JDL, a "light" ClassAd: ``Name = value;`` pairs, optionally inside ``[ ... ]``,
whose values are quoted strings, bare words and numbers, ``{ ... }`` lists, nested ``[ ... ]`` ClassAds or ClassAd
expressions. DIRAC itself is lenient (a bare ``Site = LCG.CERN.cern;`` is a string, ``CPUTime = "3600"`` an int), so
:func:`parse` accepts what DIRAC accepts but reports real garbage with its line and column; :func:`render` writes one
canonical form that :func:`parse` reads back to the same dict; :func:`validate` checks and normalises a user's job
description the way DIRAC's job description model does.

Standard library only: the runner, the scheduler and the tests share it without pulling in the server's dependencies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any, Dict, List, Optional

__all__ = [
    "DEFAULTS",
    "Expression",
    "JDLError",
    "MAX_ATTRIBUTES",
    "MAX_DEPTH",
    "MAX_LIST_ITEMS",
    "MAX_NAME_LENGTH",
    "MAX_STRING_BYTES",
    "MAX_TEXT_BYTES",
    "SERVER_ATTRIBUTES",
    "dumps_value",
    "lookup",
    "parse",
    "render",
    "validate",
]

# --- bounds -------------------------------------------------------------------------------------------------------
#: Largest JDL text :func:`parse` reads (UTF-8 bytes).
MAX_TEXT_BYTES = 1 << 20
#: Most attributes in one ClassAd (each nesting level counted on its own).
MAX_ATTRIBUTES = 200
#: Largest string, bare word or expression value (UTF-8 bytes).
MAX_STRING_BYTES = 64 << 10
#: Most items in one list.
MAX_LIST_ITEMS = 10_000
#: Deepest nesting of lists and ClassAds below the top level (DIRAC's own reader stops at 10).
MAX_DEPTH = 10
#: Longest attribute name (DIRAC's JobParameters.Name is VARCHAR(100)).
MAX_NAME_LENGTH = 100

_INT_MAX = 2**31 - 1  # fits every DB's INTEGER column
_MAX_PROCESSORS = 1024  # DIRAC's JobDescription/MaxNumberOfProcessors default
_MAX_INPUT_DATA = 500  # DIRAC's JobDescription/MaxInputData default
_TQ_VALUE_LENGTH = 128  # tq_TQTo*.Value column
_LOG_LEVELS = ("DEBUG", "VERBOSE", "INFO", "WARN", "NOTICE", "ERROR", "ALWAYS", "FATAL")  # DIRAC's gLogger levels

#: Defaults :func:`validate` fills in (DIRAC's job description model defaults).
DEFAULTS: Mapping[str, object] = {
    "JobType": "User",
    "StdOutput": "std.out",
    "StdError": "std.err",
    "CPUTime": 86400,
    "Priority": 1,
    "NumberOfProcessors": 1,
}

#: Attributes the server sets from the submitter's token or at insertion; a user may not give them.
SERVER_ATTRIBUTES = ("Owner", "OwnerGroup", "VirtualOrganization", "VO", "JobID", "JobRequirements")
#: Legacy attributes DIRAC silently drops from a submitted JDL.
_DROPPED_ATTRIBUTES = ("DIRACSetup", "OwnerDN")


class JDLError(ValueError):
    """A JDL that cannot be read or a job description that DIRAC would refuse.

    ``attribute`` names the offending attribute (None for errors of the whole text), ``message`` says why, and
    ``line``/``column`` (1-based) locate syntax errors in the text given to :func:`parse`.
    """

    def __init__(
        self, attribute: Optional[str], message: str, line: Optional[int] = None, column: Optional[int] = None
    ) -> None:
        self.attribute = attribute
        self.message = message
        self.line = line
        self.column = column
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        if self.attribute:
            return f"JDL attribute {self.attribute}: {where}{self.message}"
        if where:
            return f"JDL syntax error at {where}{self.message}"
        return f"invalid JDL: {self.message}"

    def __reduce__(self) -> Any:  # keep the attributes across pickling (multiprocessing, logging handlers)
        return (type(self), (self.attribute, self.message, self.line, self.column))


class Expression(str):
    """A ClassAd expression (``other.Site == "X" && other.CPU > 10``) kept verbatim as text.

    It compares equal to the plain string, but :func:`render` writes it unquoted so that its meaning survives a round
    trip; anything that would not read back as the same expression is written as a quoted string instead.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Expression({str.__repr__(self)})"


# --- scanner ------------------------------------------------------------------------------------------------------
# Every pattern is anchored at the scanner's position and runs in linear time (no catastrophic backtracking).
_SKIP = re.compile(r"(?:\s+|#[^\n]*|//[^\n]*)*")  # blanks and comments between tokens
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NAME_FULL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_BARE = re.compile(r'[^\s";,{}\[\]=()<>!&|]+')  # an unquoted word or number, as DIRAC writes them
_STRING = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"', re.S)
_UNESCAPE = re.compile(r'\\([\\"])')
_ESCAPE_BACKSLASH = re.compile(r'\\(?=[\\"]|\Z)')
_INT = re.compile(r"(?:0|-?[1-9][0-9]{0,999})\Z")
_FLOAT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?\Z")
_RAW_PLAIN = re.compile(r'[^"()\[\]{};,#/\n]*')  # expression text without anything the raw scan must look at
_ATTR_START = re.compile(r"[ \t\r\f\v]*([A-Za-z_][A-Za-z0-9_.]*)[ \t\r\f\v]*=(?!=)")
# `Name = "string"` or `Name = word` followed by ';', ']' or the end: the fast path of _Parser.body
_SIMPLE_ATTR = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=(?!=)\s*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|((?!#|//)[^\s";,{}\[\]=()<>!&|]+))'
    r"\s*(?:;|(?=\]|\Z))",
    re.S,
)
_SIMPLE_ITEM = re.compile(  # the same for a list item followed by ',' or '}' (the fast path of _Parser.list)
    r'\s*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|((?!#|//)[^\s";,{}\[\]=()<>!&|]+))\s*([,}])',
    re.S,
)
_OPERATOR = re.compile(r"[=<>!&|]+")  # only to show what was found in error messages
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_NOMATCH = object()

_ATTR_TERMS = ";]"  # what ends an attribute's value (the ']' only inside a ClassAd)
_LIST_TERMS = ",}"  # what ends a list item


def _too_long(s: str, limit: int = MAX_STRING_BYTES) -> bool:
    """UTF-8 size above limit, without encoding the (common) short strings."""
    n = len(s)
    if n * 4 <= limit:
        return False
    if n > limit:
        return True
    return len(s.encode("utf-8", "surrogatepass")) > limit


class _Parser:
    """Recursive-descent reader over one text; positions are offsets, turned into line/column only on error."""

    __slots__ = ("text", "n", "pos", "depth", "attr")

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.pos = 0
        self.depth = 0
        self.attr: Optional[str] = None

    # errors
    def where(self, pos: int) -> tuple:
        line = self.text.count("\n", 0, pos) + 1
        return line, pos - (self.text.rfind("\n", 0, pos) + 1) + 1

    def error(self, message: str, pos: Optional[int] = None, attribute: Any = _NOMATCH) -> JDLError:
        line, column = self.where(self.pos if pos is None else pos)
        return JDLError(self.attr if attribute is _NOMATCH else attribute, message, line, column)

    def found(self, pos: Optional[int] = None) -> str:
        pos = self.pos if pos is None else pos
        if pos >= self.n:
            return "end of input"
        m = _BARE.match(self.text, pos) or _OPERATOR.match(self.text, pos)
        token = m.group() if m else self.text[pos]
        return repr(token if len(token) <= 30 else token[:27] + "...")

    def skip(self) -> None:
        self.pos = _SKIP.match(self.text, self.pos).end()

    # grammar
    def document(self) -> Dict[str, object]:
        self.skip()
        if self.pos < self.n and self.text[self.pos] == "[":
            opened = self.pos
            self.pos += 1
            result = self.body("]", opened)
            self.skip()
            if self.pos < self.n:
                raise self.error(f"unexpected {self.found()} after the closing ']'", attribute=None)
            return result
        return self.body(None, -1)

    def body(self, closer: Optional[str], opened: int) -> Dict[str, object]:
        text = self.text
        result: Dict[str, object] = {}
        seen: Dict[str, str] = {}
        while True:
            fast = _SIMPLE_ATTR.match(text, self.pos)
            if fast and (closer or text[fast.end() : fast.end() + 1] != "]"):
                # the common `Name = "string";` / `Name = word;` in one match; anything else takes the long way
                name = fast.group(1)
                name_pos = fast.start(1)
                quoted = fast.group(2)
                if quoted is None:
                    value = _classify(fast.group(3))
                else:
                    value = _UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted
                self.check_attribute(name, name_pos, seen, len(result))
                if _too_long(value if quoted is not None else fast.group(3)):
                    raise self.error(
                        f"value longer than {MAX_STRING_BYTES} bytes",
                        fast.start(3) if quoted is None else fast.start(2) - 1,
                        name,
                    )
                self.pos = fast.end()
                result[name] = value
                seen[name.lower()] = name
                continue
            self.skip()
            if self.pos >= self.n:
                if closer:
                    line, column = self.where(opened)
                    raise self.error(f"'[' opened at line {line}, column {column} is never closed with ']'")
                return result
            c = text[self.pos]
            if c == closer:
                self.pos += 1
                return result
            if c == ";":  # stray or doubled ';'
                self.pos += 1
                continue
            name_pos = self.pos
            m = _NAME.match(text, name_pos)
            if not m:
                raise self.error(f"expected an attribute name, found {self.found()}")
            name = m.group()
            self.pos = m.end()
            self.skip()
            if self.pos >= self.n or text[self.pos] != "=" or text.startswith("==", self.pos):
                raise self.error(f"expected '=' after attribute name {name!r}, found {self.found()}", attribute=None)
            self.pos += 1
            self.check_attribute(name, name_pos, seen, len(result))
            outer, self.attr = self.attr, name
            result[name] = self.value(_ATTR_TERMS if closer else ";")
            seen[name.lower()] = name
            self.skip()
            if self.pos < self.n and text[self.pos] not in ";]":
                raise self.error(f"expected ';' after the value, found {self.found()}")
            self.attr = outer

    def check_attribute(self, name: str, name_pos: int, seen: Dict[str, str], count: int) -> None:
        if len(name) > MAX_NAME_LENGTH:
            raise self.error(f"attribute name longer than {MAX_NAME_LENGTH} characters", name_pos, name[:40])
        first = seen.get(name.lower())
        if first is not None:
            message = "duplicate attribute" + (f" (first given as {first!r})" if first != name else "")
            raise self.error(message, name_pos, name)
        if count >= MAX_ATTRIBUTES:
            raise self.error(f"more than {MAX_ATTRIBUTES} attributes in one ClassAd", name_pos, None)

    def value(self, terms: str) -> object:
        """One value; a simple value followed by anything but a terminator is re-read as a raw expression."""
        self.skip()
        start = self.pos
        if start >= self.n or self.text[start] in ";,]}=":
            raise self.error(f"expected a value, found {self.found()}")
        result = self.simple()
        if result is not _NOMATCH:
            self.skip()
            if self.pos >= self.n or self.text[self.pos] in terms:
                return result
            self.pos = start
        return self.raw(terms, start)

    def simple(self) -> object:
        text, pos = self.text, self.pos
        c = text[pos]
        if c == '"':
            m = _STRING.match(text, pos)
            if not m:
                raise self.error("unterminated string: no closing '\"'")
            s = m.group(1)
            if "\\" in s:
                s = _UNESCAPE.sub(r"\1", s)
            if _too_long(s):
                raise self.error(f"string longer than {MAX_STRING_BYTES} bytes")
            self.pos = m.end()
            return s
        if c == "{":
            return self.list()
        if c == "[":
            self.enter()
            self.pos += 1
            result = self.body("]", pos)
            self.depth -= 1
            return result
        m = _BARE.match(text, pos)
        if not m:
            return _NOMATCH
        token = m.group()
        if _too_long(token):
            raise self.error(f"value longer than {MAX_STRING_BYTES} bytes")
        self.pos = m.end()
        return _classify(token)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"lists and ClassAds nested more than {MAX_DEPTH} deep")

    def list(self) -> List[object]:
        opened = self.pos
        self.enter()
        self.pos += 1
        items: List[object] = []
        self.skip()
        if self.pos < self.n and self.text[self.pos] == "}":
            self.pos += 1
            self.depth -= 1
            return items
        text = self.text
        while True:
            item_pos = self.pos
            fast = _SIMPLE_ITEM.match(text, item_pos)
            if fast:  # a quoted string or a word followed by ',' or '}': the common case in one match
                quoted = fast.group(1)
                if quoted is None:
                    token = fast.group(2)
                    if _too_long(token):
                        raise self.error(f"value longer than {MAX_STRING_BYTES} bytes", fast.start(2))
                    items.append(_classify(token))
                else:
                    value = _UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted
                    if _too_long(value):
                        raise self.error(f"string longer than {MAX_STRING_BYTES} bytes", fast.start(1) - 1)
                    items.append(value)
                self.pos = fast.end()
                c = fast.group(3)
            else:
                items.append(self.value(_LIST_TERMS))
                self.skip()
                if self.pos >= self.n:
                    line, column = self.where(opened)
                    raise self.error(f"'{{' opened at line {line}, column {column} is never closed with '}}'")
                c = text[self.pos]
                self.pos += 1
            if len(items) > MAX_LIST_ITEMS:
                raise self.error(f"list longer than {MAX_LIST_ITEMS} items", item_pos)
            if c == ",":
                self.skip()
                if self.pos < self.n and self.text[self.pos] == "}":  # trailing comma
                    self.pos += 1
                    break
            elif c == "}":
                break
            else:
                raise self.error(f"expected ',' or '}}' in a list, found {self.found(self.pos - 1)}", self.pos - 1)
        self.depth -= 1
        return items

    def raw(self, terms: str, start: int) -> Expression:
        """Read an expression up to a terminator outside strings and brackets; comments are left out."""
        text, n = self.text, self.n
        pos = segment = start
        stack: List[int] = []
        parts: List[str] = []
        while True:
            pos = _RAW_PLAIN.match(text, pos).end()
            if pos >= n:
                break
            c = text[pos]
            if c == '"':
                m = _STRING.match(text, pos)
                if not m:
                    raise self.error("unterminated string: no closing '\"'", pos)
                pos = m.end()
            elif c in "([{":
                stack.append(pos)
                pos += 1
            elif c in ")]}":
                if not stack:
                    if c in terms:
                        break
                    raise self.error(f"unexpected {c!r}", pos)
                opener = stack.pop()
                if _CLOSERS[text[opener]] != c:
                    line, column = self.where(opener)
                    raise self.error(
                        f"{c!r} does not close {text[opener]!r} opened at line {line}, column {column}", pos
                    )
                pos += 1
            elif c in ";,":
                if not stack and c in terms:
                    break
                pos += 1
            elif c == "\n":
                pos += 1
                if not stack and ";" in terms:
                    m = _ATTR_START.match(text, pos)
                    if m:
                        raise self.error(f"expected ';' before attribute {m.group(1)!r}", m.start(1))
            elif (c == "#" or text.startswith("//", pos)) and (pos == start or text[pos - 1].isspace()):
                parts.append(text[segment:pos])
                end = text.find("\n", pos)
                pos = segment = n if end < 0 else end
            else:  # '#' or '/' inside a word
                pos += 1
        if stack:
            line, column = self.where(stack[-1])
            raise self.error(f"{text[stack[-1]]!r} opened at line {line}, column {column} is never closed", n)
        parts.append(text[segment:pos])
        expression = "".join(parts).strip()
        if not expression:
            raise self.error(f"expected a value, found {self.found(pos)}", pos)
        if _too_long(expression):
            raise self.error(f"expression longer than {MAX_STRING_BYTES} bytes", start)
        self.pos = pos
        return Expression(expression)


def _classify(token: str) -> object:
    """Type a bare word as DIRAC reads it; numbers only when their canonical text is what was written (lossless)."""
    if len(token) <= 5:
        low = token.lower()
        if low == "true":
            return True
        if low == "false":
            return False
    if token[0] in "-0123456789":
        if _INT.match(token):
            return int(token)
        if _FLOAT.match(token):
            number = float(token)
            if repr(number) == token:
                return number
    return token


def parse(text: str) -> Dict[str, object]:
    """Read a DIRAC ClassAd-light JDL into a dict, keeping the attribute names as first spelled.

    Values become str, int, float, bool, list, dict (a nested ClassAd) or :class:`Expression`. A bare number is an
    int or float only when that is exactly how the number would be written back (``007``, ``1e3``, ``3.10`` stay
    strings, so nothing is lost); ``true``/``false`` are booleans in any case. In quoted strings only ``\\"`` and
    ``\\\\`` are escapes; other backslashes are kept, as DIRAC keeps them. ``#`` or ``//`` where a token could start
    comments out the rest of the line. Raises :class:`JDLError` with line and column for anything DIRAC could not
    make sense of, duplicates (names are case-insensitive) and texts or values beyond the module's bounds.
    """
    if not isinstance(text, str):
        raise JDLError(None, f"a JDL must be text (str), got {type(text).__name__}")
    if _too_long(text, MAX_TEXT_BYTES):
        raise JDLError(None, f"JDL text longer than {MAX_TEXT_BYTES} bytes")
    nul = text.find("\x00")
    parser = _Parser(text)
    if nul >= 0:
        raise parser.error("NUL character in the JDL", nul, None)
    return parser.document()


# --- rendering ----------------------------------------------------------------------------------------------------
def _show(value: object) -> str:
    """A short description of a rejected value for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        return text
    return f"{type(value).__name__} {text}"


def _quote(name: Optional[str], s: str) -> str:
    if _too_long(s):
        raise JDLError(name, f"string longer than {MAX_STRING_BYTES} bytes")
    if "\x00" in s:
        raise JDLError(name, "NUL character in a string")
    if "\\" in s:
        s = _ESCAPE_BACKSLASH.sub(r"\\\\", s)
    return '"' + s.replace('"', '\\"') + '"'


def _expression_text(name: Optional[str], expression: str) -> str:
    """The expression unquoted if it reads back as the very same expression, else as a quoted string."""
    parser = _Parser(expression)
    parser.attr = name
    try:
        result = parser.value(_ATTR_TERMS + _LIST_TERMS)
        exact = parser.pos >= parser.n and type(result) is Expression and result == expression
    except JDLError:
        exact = False
    return str(expression) if exact else _quote(name, expression)


def _check_name(name: object, seen: Dict[str, str]) -> str:
    if not isinstance(name, str) or not _NAME_FULL.match(name):
        raise JDLError(
            None,
            f"attribute names are letters, digits, '_' and '.', starting with a letter or '_', got {_show(name)}",
        )
    if len(name) > MAX_NAME_LENGTH:
        raise JDLError(name[:40], f"attribute name longer than {MAX_NAME_LENGTH} characters")
    key = name.lower()
    if key in seen:
        raise JDLError(name, f"given more than once (also as {seen[key]!r}); JDL names are case-insensitive")
    seen[key] = name
    return name


def _sorted_names(attrs: Mapping[Any, object]) -> List[str]:
    if len(attrs) > MAX_ATTRIBUTES:
        raise JDLError(None, f"more than {MAX_ATTRIBUTES} attributes in one ClassAd")
    seen: Dict[str, str] = {}
    names = [_check_name(name, seen) for name in attrs]
    names.sort(key=lambda name: (name.lower(), name))
    return names


def _dump(name: Optional[str], value: object, depth: int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(int(value))  # int(): an IntEnum's str() is its member name before Python 3.11
        except ValueError:  # more digits than Python converts
            raise JDLError(name, "integer too large") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise JDLError(name, f"{value!r} has no JDL form; numbers must be finite")
        return repr(float(value))
    if isinstance(value, Expression):
        return _expression_text(name, value)
    if isinstance(value, str):
        return _quote(name, str(value))
    if isinstance(value, (list, tuple)):
        if depth > MAX_DEPTH:
            raise JDLError(name, f"lists and ClassAds nested more than {MAX_DEPTH} deep")
        if len(value) > MAX_LIST_ITEMS:
            raise JDLError(name, f"list longer than {MAX_LIST_ITEMS} items")
        return "{" + ", ".join([_dump(name, item, depth + 1) for item in value]) + "}"
    if isinstance(value, Mapping):
        if depth > MAX_DEPTH:
            raise JDLError(name, f"lists and ClassAds nested more than {MAX_DEPTH} deep")
        inner = [f"{key} = {_dump(key, value[key], depth + 1)}" for key in _sorted_names(value)]
        return "[" + "; ".join(inner) + "]"
    raise JDLError(name, f"has no JDL form: {_show(value)}")


def _render_body(attrs: Mapping[Any, object], level: int, out: List[str]) -> None:
    indent = "    " * level
    for name in _sorted_names(attrs):
        value = attrs[name]
        if isinstance(value, Mapping) and value:
            if level > MAX_DEPTH:
                raise JDLError(name, f"lists and ClassAds nested more than {MAX_DEPTH} deep")
            out.append(f"{indent}{name} = [")
            _render_body(value, level + 1, out)
            out.append(f"{indent}];")
        else:
            out.append(f"{indent}{name} = {_dump(name, value, level)};")


def render(attrs: Mapping[str, object]) -> str:
    """Write attributes as a canonical JDL: one attribute a line, sorted by name, strings always quoted.

    Sorting makes equal descriptions render identically; ``parse(render(x)) == x`` for every value :func:`parse`
    produces (tuples come back as lists). Raises :class:`JDLError` for values with no JDL form.
    """
    if not isinstance(attrs, Mapping):
        raise JDLError(None, f"a job description must be a mapping of attribute names to values, got {_show(attrs)}")
    out = ["["]
    _render_body(attrs, 1, out)
    out.append("]")
    return "\n".join(out)


def dumps_value(value: object) -> str:
    """One value in JDL syntax, on one line (a nested ClassAd as ``[A = 1; B = "x"]``)."""
    return _dump(None, value, 1)


def to_jsonable(value: object) -> object:
    """A parsed JDL value as plain JSON types (expressions and other str subclasses become ``str``)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)


def lookup(attrs: Mapping[str, object], name: str, default: object = None) -> object:
    """``attrs[name]`` with JDL's case-insensitive names, for dicts straight from :func:`parse`."""
    if name in attrs:
        return attrs[name]
    key = name.lower()
    for candidate, value in attrs.items():
        if isinstance(candidate, str) and candidate.lower() == key:
            return value
    return default


# --- validation ---------------------------------------------------------------------------------------------------
def _text(name: str, value: object, what: str = "a string") -> str:
    """A scalar as text: bare JDL numbers and booleans are strings to DIRAC too (``JobName = 42;``)."""
    if isinstance(value, str):
        text = str(value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        raise JDLError(name, f"must be {what}, got {_show(value)}")
    if _too_long(text):
        raise JDLError(name, f"string longer than {MAX_STRING_BYTES} bytes")
    if "\x00" in text:
        raise JDLError(name, "NUL character in a string")
    return text


def _bounded(name: str, text: str, limit: int) -> str:
    if len(text) > limit:
        raise JDLError(name, f"must be at most {limit} characters, got {_show(text)}")
    return text


def _int(name: str, value: object, what: str, low: int, high: int) -> int:
    """An int, or a string of digits as DIRAC's getAttributeInt reads it; bools and floats are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,30}\s*", value):
        number = int(value)
    else:
        raise JDLError(name, f"must be {what}, got {_show(value)}")
    if not low <= number <= high:
        raise JDLError(name, f"must be {what} ({low}..{high}), got {number}")
    return number


def _items(name: str, value: object, split_commas: bool = False) -> List[str]:
    """A list of strings from a list or a single string; stripped, without empties and duplicates (DIRAC uses sets).

    ``split_commas`` reads a single ``"A,B"`` as two items, as DIRAC does for site and tag lists.
    """
    if isinstance(value, (list, tuple)):
        raw = value
        if len(raw) > MAX_LIST_ITEMS:
            raise JDLError(name, f"list longer than {MAX_LIST_ITEMS} items")
    elif isinstance(value, Expression):  # `X = "a", "b";`: DIRAC reads it as a list, quotes dropped
        raw = _text(name, value).replace('"', "").split(",")
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = _text(name, value)
        raw = text.split(",") if split_commas else [text]
    else:
        raise JDLError(name, f"must be a list of strings or a single string, got {_show(value)}")
    result: List[str] = []
    seen = set()
    for index, item in enumerate(raw, 1):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise JDLError(name, f"item {index} must be a string, got {_show(item)}")
        text = _text(name, item).strip()
        if text and text not in seen:
            seen.add(text)
            result.append(text)
    return result


def _names_list(name: str, value: object) -> List[str]:
    """Sites, CEs, platforms and tags: task-queue key values, so each fits the tq_TQTo* column."""
    items = _items(name, value, split_commas=True)
    for item in items:
        if len(item) > _TQ_VALUE_LENGTH:
            raise JDLError(name, f"each item must be at most {_TQ_VALUE_LENGTH} characters, got {_show(item)}")
    return items


def _relative_path(name: str, path: str) -> str:
    """Names of files the job wrapper writes or collects must stay inside the job's directory."""
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", path):
        raise JDLError(name, f"must be a path relative to the job's directory without '..', got {_show(path)}")
    return path


def _filename(name: str, value: object) -> str:
    text = _text(name, value).strip()
    if not text:
        raise JDLError(name, "must not be empty")
    return _relative_path(name, text)


def _environment(name: str, value: object) -> List[str]:
    items = _items(name, value)
    keys: Dict[str, str] = {}
    for item in items:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise JDLError(name, f"items must be 'NAME=value' with a valid variable name, got {_show(item)}")
        if key in keys:
            raise JDLError(name, f"variable {key!r} set more than once")
        keys[key] = item
    return items


def _input_sandbox(name: str, value: object) -> List[str]:
    items = _items(name, value)
    for item in items:
        if item.startswith("LFN:") and not item.startswith("LFN:/"):
            raise JDLError(name, f"LFN entries must start with 'LFN:/', got {_show(item)}")
    return items


def _output_sandbox(name: str, value: object) -> List[str]:
    return [_relative_path(name, item) for item in _items(name, value)]


def _input_data(name: str, value: object) -> List[str]:
    """DIRAC's rules: '/x' means 'LFN:/x', every entry is an LFN:/ without '//', at most 500 files."""
    result: List[str] = []
    seen = set()
    for item in _items(name, value):
        lfn = "LFN:" + item if item.startswith("/") else item
        if not lfn.startswith("LFN:/"):
            raise JDLError(name, f"entries must be LFNs starting with '/' or 'LFN:/', got {_show(item)}")
        if "//" in lfn:
            raise JDLError(name, f"entries must not contain '//', got {_show(item)}")
        if lfn not in seen:
            seen.add(lfn)
            result.append(lfn)
    if len(result) > _MAX_INPUT_DATA:
        raise JDLError(name, f"at most {_MAX_INPUT_DATA} files, got {len(result)}")
    return result


def _string(name: str, value: object) -> str:
    return _text(name, value)


def _executable(name: str, value: object) -> str:
    text = _text(name, value)
    if not text.strip():
        raise JDLError(name, "must not be empty")
    return text


def _job_name(name: str, value: object) -> str:
    return _bounded(name, _text(name, value), 128)  # Jobs.JobName / Jobs.JobGroup are VARCHAR(128)


def _log_level(name: str, value: object) -> str:
    level = _text(name, value).strip().upper()
    if level not in _LOG_LEVELS:
        raise JDLError(name, f"must be one of {', '.join(_LOG_LEVELS)}, got {_show(value)}")
    return level


def _site(name: str, value: object) -> List[str]:
    # "ANY" and "" mean "no constraint" (DIRAC's Job.setDestination)
    return [site for site in _names_list(name, value) if site.upper() != "ANY"]


def _cpu_time(name: str, value: object) -> int:
    return _int(name, value, "a positive integer number of seconds", 1, _INT_MAX)


def _processors(name: str, value: object) -> int:
    return _int(name, value, "an integer number of processors", 1, _MAX_PROCESSORS)


def _ram(name: str, value: object) -> int:
    return _int(name, value, "a non-negative integer number of MB", 0, _INT_MAX)


def _priority(name: str, value: object) -> int:
    return _int(name, value, "an integer priority", 0, 10)  # DIRAC's JobDescription/Min|MaxPriority defaults


_VALIDATORS = {
    "Executable": _executable,
    "Arguments": _string,
    "JobName": _job_name,
    "JobGroup": _job_name,
    "JobType": _string,
    "Origin": _string,
    "LogLevel": _log_level,
    "StdOutput": _filename,
    "StdError": _filename,
    "InputSandbox": _input_sandbox,
    "OutputSandbox": _output_sandbox,
    "InputData": _input_data,
    "InputDataPolicy": _string,
    "OutputData": _items,
    "OutputPath": _string,
    "OutputSE": _string,
    "JobConfigArgs": _string,
    "Site": _site,
    "BannedSites": _names_list,
    "GridCE": _names_list,
    "Platform": _names_list,
    "Tags": _names_list,
    "Environment": _environment,
    "ExecutionEnvironment": _environment,
    "CPUTime": _cpu_time,
    "NumberOfProcessors": _processors,
    "MinNumberOfProcessors": _processors,
    "MaxNumberOfProcessors": _processors,
    "MinRAM": _ram,
    "MaxRAM": _ram,
    "Priority": _priority,
}
_CANONICAL = {name.lower(): name for name in _VALIDATORS}
_SERVER = {name.lower(): name for name in SERVER_ATTRIBUTES}
_DROPPED = {name.lower() for name in _DROPPED_ATTRIBUTES}


def _copy_value(name: str, value: object, depth: int) -> object:
    """A checked copy of a custom attribute's value: JDL types only, within bounds (tuples become lists)."""
    if isinstance(value, (bool, int, float, str)):
        _dump(name, value, depth)  # type, size and finiteness checks
        if isinstance(value, (bool, Expression)):
            return value
        if isinstance(value, int):  # plain types for subclasses such as IntEnum
            return int(value)
        return float(value) if isinstance(value, float) else str(value)
    if depth > MAX_DEPTH and isinstance(value, (list, tuple, Mapping)):
        raise JDLError(name, f"lists and ClassAds nested more than {MAX_DEPTH} deep")
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_ITEMS:
            raise JDLError(name, f"list longer than {MAX_LIST_ITEMS} items")
        return [_copy_value(name, item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        return {key: _copy_value(key, value[key], depth + 1) for key in _sorted_names(value)}
    raise JDLError(name, f"must be a JDL value (string, number, boolean, list or ClassAd), got {_show(value)}")


def validate(attrs: Mapping[str, object], *, allowed_job_types: Optional[Collection[str]] = None) -> Dict[str, object]:
    """Check a user's job description and return it normalised, as DIRAC's job description model would.

    Known attributes get their canonical spelling and type (lists of strings, ints), defaults are filled in
    (:data:`DEFAULTS`), identity attributes are refused because the server sets them from the token, and custom
    attributes are kept as they are if they are JDL values. ``allowed_job_types`` restricts ``JobType`` (DIRAC's
    ``JobDescription/AllowedJobTypes``); None allows any. Raises :class:`JDLError` naming the attribute.
    """
    if not isinstance(attrs, Mapping):
        raise JDLError(None, f"a job description must be a mapping of attribute names to values, got {_show(attrs)}")
    if len(attrs) > MAX_ATTRIBUTES:
        raise JDLError(None, f"more than {MAX_ATTRIBUTES} attributes")
    seen: Dict[str, str] = {}
    known: Dict[str, Any] = {}
    extra: Dict[str, object] = {}
    for name in attrs:
        _check_name(name, seen)
        key = name.lower()
        value = attrs[name]
        if key in _SERVER:
            raise JDLError(
                _SERVER[key], "is set by the server from the submitter's token and must not be given in the JDL"
            )
        if key == "parameters" or key.startswith("parameters."):
            raise JDLError(name, "parametric jobs are not supported; submit one plain JDL per job")
        if key in _DROPPED:
            continue
        canonical = _CANONICAL.get(key)
        if canonical is None:
            extra[name] = _copy_value(name, value, 1)
        else:
            known[canonical] = _VALIDATORS[canonical](canonical, value)

    if "Executable" not in known:
        raise JDLError("Executable", "is required")
    job_type = _bounded("JobType", str(known.get("JobType", DEFAULTS["JobType"])).strip(), 32)
    if not job_type:
        raise JDLError("JobType", "must not be empty")
    if allowed_job_types is not None and job_type not in allowed_job_types:
        raise JDLError("JobType", f"{job_type!r} is not allowed (allowed: {', '.join(sorted(allowed_job_types))})")
    known["JobType"] = job_type

    _check_processors(known)
    min_ram, max_ram = known.get("MinRAM"), known.get("MaxRAM")
    if max_ram and min_ram is not None and min_ram > max_ram:  # MaxRAM 0 = no upper limit
        raise JDLError("MaxRAM", f"must not be less than MinRAM ({max_ram} < {min_ram}); 0 means no limit")
    sites: Any = known.get("Site")
    banned: Any = known.get("BannedSites")
    if sites and banned:  # DIRAC: explicit sites minus banned ones, and then the ban has nothing left to do
        remaining = [site for site in sites if site not in banned]
        if not remaining:
            raise JDLError("Site", "every requested site is also in BannedSites")
        known["Site"] = remaining
        del known["BannedSites"]

    for name, default in DEFAULTS.items():
        if name == "NumberOfProcessors" and ("MinNumberOfProcessors" in known or "MaxNumberOfProcessors" in known):
            continue  # a range was asked for; an exact number would contradict it
        known.setdefault(name, default)
    result = {name: known[name] for name in _VALIDATORS if name in known}
    result.update(extra)
    return result


def _check_processors(known: Dict[str, Any]) -> None:
    exact = known.get("NumberOfProcessors")
    low = known.get("MinNumberOfProcessors")
    high = known.get("MaxNumberOfProcessors")
    if exact is not None:
        if low is not None and low > exact:
            raise JDLError("MinNumberOfProcessors", f"must not exceed NumberOfProcessors ({low} > {exact})")
        if high is not None and high < exact:
            raise JDLError("MaxNumberOfProcessors", f"must not be less than NumberOfProcessors ({high} < {exact})")
    elif low is not None and high is not None and high < low:
        raise JDLError("MaxNumberOfProcessors", f"must not be less than MinNumberOfProcessors ({high} < {low})")
