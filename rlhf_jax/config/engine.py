"""Frozen dataclasses as text and JSON: ``key=value`` overrides, printing, JSON, type and range checks.

Nothing here knows the experiment schema. The engine reads the field types (``bool``, ``int``, ``float``,
``str``, string enums, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]`` and nested dataclasses) and two
kinds of field metadata that the schema declares with :func:`fixed` and :func:`variants`:

- a *fixed* field is never set by an override and never printed (an experiment's or a stage's name);
- a *variants* field is a non-empty ``tuple[Base, ...]`` whose items are of several dataclasses, told apart
  by a class attribute (the *tag*, ``kind``) that JSON carries, and addressed in overrides by the value of one
  of their fields (the *key*, ``name``): ``stages.rm.learning_rate=1e-5``.

Every error is one :class:`~rlhf_jax.errors.ConfigError` line naming the dotted key, the value and what was
expected, with a did-you-mean for a misspelt key. Standard library only: the launcher starts fast.
"""

import dataclasses
import difflib
import enum
import functools
import json
import math
import pathlib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rlhf_jax.errors import ConfigError, UserError

# --------------------------------------------------------------------------------------------
# What the schema declares.

_FIXED = "fixed"
_VARIANTS = "variants"


def fixed(why: str, **kwargs) -> Any:
    """A field that overrides may not set, and that :func:`to_overrides` leaves out; ``why`` ends the error."""
    return dataclasses.field(metadata={_FIXED: why}, **kwargs)


@dataclasses.dataclass(frozen=True)
class Variants:
    """How the items of a ``tuple[Base, ...]`` field of several dataclasses are told apart and addressed."""

    classes: tuple[type, ...]  # an item is of exactly one of these classes
    noun: str  # one item, in messages: "stage"
    tag: str = "kind"  # the class attribute naming an item's class; JSON writes it beside the fields
    key: str = "name"  # the field whose value addresses an item in overrides: FIELD.<value>.KEY=VALUE

    def tag_of(self, cls: type) -> str:
        value = getattr(cls, self.tag)
        return value.value if isinstance(value, enum.Enum) else value


def variants(classes: Sequence[type], noun: str, **kwargs) -> Any:
    """A field holding a non-empty tuple of items of the ``classes``; see :class:`Variants`."""
    return dataclasses.field(metadata={_VARIANTS: Variants(tuple(classes), noun)}, **kwargs)


def _metadata(obj_or_cls: Any, name: str) -> Mapping[str, Any]:
    return next((field.metadata for field in _fields(obj_or_cls) if field.name == name), {})


def _fixed(obj_or_cls: Any, name: str) -> bool:
    return _FIXED in _metadata(obj_or_cls, name)


def _variants(obj_or_cls: Any, name: str) -> Variants | None:
    return _metadata(obj_or_cls, name).get(_VARIANTS)


# --------------------------------------------------------------------------------------------
# Types: description, checking, parsing and printing of field values.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(obj_or_cls: Any) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(obj_or_cls)


def _names(obj_or_cls: Any) -> list[str]:
    return [field.name for field in _fields(obj_or_cls)]


def _optional_inner(tp: Any) -> Any | None:
    """X for ``X | None``; None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _tuple_items(tp: Any) -> tuple[Any, ...] | None:
    """The element types of ``tuple[X, ...]`` (as ``(X, ...)``) or ``tuple[X, Y]``; None otherwise."""
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)
    return None


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)}, or None"
    items = _tuple_items(tp)
    if items is not None:
        if len(items) == 2 and items[1] is Ellipsis:
            return f"a comma-separated list of ({_describe(items[0])})"
        return f"{len(items)} comma-separated values ({'; '.join(_describe(item) for item in items)})"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if _is_enum(tp):
        return "one of " + ", ".join(member.value for member in tp)
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__}"
    return str(tp)


def _has_type(value: Any, tp: Any) -> bool:
    inner = _optional_inner(tp)
    if inner is not None:
        return value is None or _has_type(value, inner)
    items = _tuple_items(tp)
    if items is not None:
        if not isinstance(value, tuple):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_has_type(item, items[0]) for item in value)
        return len(value) == len(items) and all(map(_has_type, value, items))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if _is_enum(tp):
        # A plain string equal to a member's value is accepted: a StrEnum compares equal to it.
        return isinstance(value, tp) or (isinstance(value, str) and value in {m.value for m in tp})
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _json_string(text: str) -> str | None:
    """The string a JSON string literal like ``"a\\nb"`` stands for; None if ``text`` is not one."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(value, str):
            return value
    return None


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse an override's text to a value of the field type ``tp``; ConfigError names ``key``.

    bool: true/false/1/0/yes/no/on/off; int; float; str (raw, or a JSON string literal such as
    ``"a\\nb"`` for newlines, leading spaces or a literal None); Enum members by value; ``None``/``null``
    for optional fields; tuples as ``a,b,c`` or ``(a,b)`` (elements may be JSON string literals).
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in _NONE:
            return None
        return parse_value(text, inner, key)
    items = _tuple_items(tp)
    if items is not None:
        return _parse_tuple(text, tp, items, key)
    stripped = text.strip()
    if tp is str:
        quoted = _json_string(stripped)
        return quoted if quoted is not None else text
    if tp is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
    elif tp is int:
        try:
            return int(stripped)
        except ValueError:
            pass
        try:  # 1e4 and 2.0 name integers too
            number = float(stripped)
        except ValueError:
            pass
        else:
            if number.is_integer() and abs(number) < 2**53:
                return int(number)
    elif tp is float:
        try:
            return float(stripped)
        except ValueError:
            pass
    elif _is_enum(tp):
        by_value = {member.value.lower(): member for member in tp}
        if stripped.lower() in by_value:
            return by_value[stripped.lower()]
    elif dataclasses.is_dataclass(tp):
        keys = ", ".join(f"{key}.{field.name}" for field in _fields(tp))
        raise ConfigError(f"{key} is a group of settings, not a value; set one of its keys: {keys}")
    raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")


def _parse_tuple(text: str, tp: Any, items: tuple[Any, ...], key: str) -> tuple:
    body = text.strip()
    if len(body) >= 2 and (body[0], body[-1]) in (("(", ")"), ("[", "]")):
        body = body[1:-1]
    elements: list[tuple[str, bool]] = []  # (text, was a JSON string literal)
    position = 0
    decoder = json.JSONDecoder()
    while body.strip():
        while position < len(body) and body[position].isspace():
            position += 1
        if position < len(body) and body[position] == '"':
            try:
                value, position = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}") from None
            elements.append((value, True))
            while position < len(body) and body[position].isspace():
                position += 1
        else:
            comma = body.find(",", position)
            end = len(body) if comma < 0 else comma
            elements.append((body[position:end].strip(), False))
            position = end
        if position >= len(body):
            break
        if body[position] != ",":
            raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")
        position += 1
        if not body[position:].strip():  # a trailing comma, as in (a,)
            break
    homogeneous = len(items) == 2 and items[1] is Ellipsis
    if not homogeneous and len(elements) != len(items):
        raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")
    values = []
    for index, (element, quoted) in enumerate(elements):
        item_tp = items[0] if homogeneous else items[index]
        if quoted and item_tp is str:
            values.append(element)
        else:
            try:
                values.append(parse_value(json.dumps(element) if quoted else element, item_tp, key))
            except ConfigError:
                raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}") from None
    return tuple(values)


def _needs_quotes(text: str, in_list: bool) -> bool:
    return (
        text != text.strip()
        or text.startswith('"')
        or not text.isprintable()
        or text.lower() in _NONE
        or (in_list and (not text or any(c in text for c in ",()[]")))
    )


def format_value(value: Any, tp: Any) -> str:
    """The override text that :func:`parse_value` turns back into exactly ``value``."""
    if value is None:
        return "None"
    inner = _optional_inner(tp)
    if inner is not None:
        return format_value(value, inner)
    items = _tuple_items(tp)
    if items is not None:
        homogeneous = len(items) == 2 and items[1] is Ellipsis
        parts = []
        for index, item in enumerate(value):
            text = format_value(item, items[0] if homogeneous else items[index])
            if isinstance(item, str) and not isinstance(item, enum.Enum) and _needs_quotes(item, True):
                text = json.dumps(item)
            parts.append(text)
        return "(" + ",".join(parts) + (",)" if len(parts) == 1 else ")")
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and tp is str:
        return json.dumps(value) if _needs_quotes(value, False) else value
    return str(value)


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return repr(value)


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}: got {_show(value)}, expected {expected}")


def _suggest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIXchoice'?)`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _suggest_key(cls: type, word: str, prefix: str = "") -> str:
    """`_suggest` over the fields of the config class `cls`; a field of one of its groups comes first, so a
    key that moved into a group is found there (``stages.ppo.kl_coef`` -> ``stages.ppo.algorithm.kl_coef``)."""
    hints = _hints(cls)
    for name in _names(cls):
        group = hints.get(name)
        if dataclasses.is_dataclass(group) and word in _names(group):
            return f" (did you mean {prefix + name + '.' + word!r}?)"
    return _suggest(word, _names(cls), prefix)


# --------------------------------------------------------------------------------------------
# Overrides: key=value lines in, key=value lines out.


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Return ``config`` with each ``dotted.key=value`` applied in order (a later one wins).

    Items of a variants field are addressed by their key: ``stages.sft.learning_rate=1e-5``. Raises
    ConfigError for an unknown key (suggesting the closest sibling), a group used as a value, a fixed key,
    or a value of the wrong type. Ranges are the schema's checks' job.
    """
    for override in overrides:
        key, equals, text = override.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"expected key=value, got {override!r}")
        config = _set(config, key.split("."), text, key)
    return config


def _set(obj: Any, parts: list[str], text: str, full_key: str, done: tuple[str, ...] = ()) -> Any:
    head, rest = parts[0], parts[1:]
    here = ".".join(done + (head,))
    names = [name for name in _names(obj) if not _fixed(obj, name)]
    many = _variants(obj, head)
    if many is not None:
        items = getattr(obj, head)
        keys = [getattr(item, many.key) for item in items]
        if not rest:
            raise ConfigError(f"{here} is the list of {many.noun}s, not a value; set a {many.noun}'s key, e.g. "
                              f"{here}.{keys[0] if keys else 'NAME'}.KEY=VALUE")
        if rest[0] not in keys:
            owner = f" of {obj.name}" if isinstance(getattr(obj, "name", None), str) else ""
            raise ConfigError(f"unknown {many.noun} {here + '.' + rest[0]!r}{_suggest(rest[0], keys, here + '.')}; "
                              f"the {many.noun}s{owner} are: {', '.join(keys)}")
        index = keys.index(rest[0])
        if len(rest) == 1:
            settable = ", ".join(name for name in _names(items[index]) if not _fixed(items[index], name))
            raise ConfigError(f"{here}.{rest[0]} is a {many.noun}, not a value; set one of its keys: {settable}")
        item = _set(items[index], rest[1:], text, full_key, (*done, head, rest[0]))
        return dataclasses.replace(obj, **{head: items[:index] + (item,) + items[index + 1:]})
    if head not in names:
        if _fixed(obj, head):
            raise ConfigError(f"{here} cannot be overridden: {_metadata(obj, head)[_FIXED]}")
        group = ".".join(done) or "the top level"
        raise ConfigError(f"unknown key {full_key!r}{_suggest_key(type(obj), head, here[: -len(head)])}; "
                          f"the keys of {group} are: {', '.join(names)}")
    tp = _hints(type(obj))[head]
    if not rest:
        return dataclasses.replace(obj, **{head: parse_value(text, tp, here)})
    child = getattr(obj, head)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"unknown key {full_key!r}: {here} is a value ({_describe(tp)}), not a group")
    return dataclasses.replace(obj, **{head: _set(child, rest, text, full_key, done + (head,))})


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, type) for every overridable value under ``obj``."""
    hints = _hints(type(obj))
    for field in _fields(obj):
        if _FIXED in field.metadata:
            continue
        value = getattr(obj, field.name)
        key = prefix + field.name
        many = field.metadata.get(_VARIANTS)
        if many is not None:
            for item in value:
                yield from _leaves(item, f"{key}.{getattr(item, many.key)}.")
        elif dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            yield key, value, hints[field.name]


def override_lines(config: Any) -> list[str]:
    """Every overridable value of ``config`` as a ``key=value`` line that :func:`apply_overrides` reads back
    exactly; one value per line, so values may contain spaces."""
    return [f"{key}={format_value(value, tp)}" for key, value, tp in _leaves(config, "")]


# --------------------------------------------------------------------------------------------
# JSON.


def to_dict(obj: Any) -> Any:
    """A JSON-ready form of a config; each item of a variants field carries its tag (a stage its ``kind``)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for field in _fields(obj):
            value = getattr(obj, field.name)
            many = field.metadata.get(_VARIANTS)
            if many is not None and isinstance(value, tuple):
                out[field.name] = [{many.tag: many.tag_of(type(item)), **to_dict(item)} for item in value]
            else:
                out[field.name] = to_dict(value)
        return out
    if isinstance(obj, tuple):
        return [to_dict(item) for item in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def from_dict(data: Any, cls: type, key: str = "") -> Any:
    """Rebuild a ``cls`` from :func:`to_dict`'s form; ConfigError on unknown keys or wrong types."""
    where = key or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {type(data).__name__}, expected an object with the keys of {cls.__name__}")
    hints = _hints(cls)
    known = _names(cls)
    for name in data:
        if name not in known:
            raise ConfigError(f"unknown key {_join(key, name)!r}{_suggest_key(cls, name, _join(key, ''))}")
    values = {}
    for name, value in data.items():
        many = _variants(cls, name)
        if many is not None:
            values[name] = _variants_from_json(value, many, _tuple_items(hints[name])[0], _join(key, name))
        else:
            values[name] = _from_json(value, hints[name], _join(key, name))
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"{where}: {error}") from None


def _variants_from_json(value: Any, many: Variants, base: type, key: str) -> tuple:
    if not isinstance(value, list):
        raise _bad(key, value, "a list")
    by_tag = {many.tag_of(cls): cls for cls in many.classes}
    items = []
    for index, data in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: got {type(data).__name__}, expected an object with the keys of "
                              f"{base.__name__}")
        tag = data.get(many.tag)
        if tag not in by_tag:
            raise _bad(f"{where}.{many.tag}", tag, "one of " + ", ".join(by_tag))
        fields = {name: item for name, item in data.items() if name != many.tag}
        items.append(from_dict(fields, by_tag[tag], where))
    return tuple(items)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _from_json(value: Any, tp: Any, key: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _from_json(value, inner, key)
    items = _tuple_items(tp)
    if items is not None:
        if not isinstance(value, list):
            raise _bad(key, value, "a list")
        homogeneous = len(items) == 2 and items[1] is Ellipsis
        return tuple(
            _from_json(item, items[0] if homogeneous else items[i], f"{key}[{i}]") for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key)
    if _is_enum(tp):
        if isinstance(value, str) and value in {member.value for member in tp}:
            return tp(value)
        raise _bad(key, value, _describe(tp))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not _has_type(value, tp):
        raise _bad(key, value, _describe(tp))
    return value


def save_config(config: Any, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def read_config(path: str | pathlib.Path, cls: type) -> Any:
    """The ``cls`` that :func:`save_config` wrote to ``path``; each error names the file (no range checks)."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    try:
        return from_dict(data, cls)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# --------------------------------------------------------------------------------------------
# Checks the schema's validation is made of.


def _check_types(obj: Any, prefix: str) -> None:
    """Every (nested) field holds a value of its declared type; the items of a variants field are of its classes."""
    hints = _hints(type(obj))
    for field in _fields(obj):
        value = getattr(obj, field.name)
        key = prefix + field.name
        tp = hints[field.name]
        many = field.metadata.get(_VARIANTS)
        if many is not None:
            if not isinstance(value, tuple) or not value:
                raise _bad(key, value, f"a non-empty tuple of {many.noun}s")
            for index, item in enumerate(value):
                if type(item) not in many.classes:
                    kinds = ", ".join(cls.__name__ for cls in many.classes)
                    raise ConfigError(f"{key}[{index}]: got {type(item).__name__}, expected one of {kinds}")
                name = getattr(item, many.key)
                _check_types(item, f"{key}.{name if isinstance(name, str) else f'[{index}]'}.")
        elif not _has_type(value, tp):
            raise _bad(key, value, _describe(tp))
        elif dataclasses.is_dataclass(value):
            _check_types(value, key + ".")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise _bad(key, value, expected)


Rule = tuple[Callable[[Any], bool], str]  # (predicate of a set value, what is expected)


def _check_range(obj: Any, prefix: str, rules: dict[str, Rule]) -> None:
    """Each named field of ``obj`` is finite (if a float) and, unless None, satisfies its rule."""
    for name, (predicate, expected) in rules.items():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(prefix + name, value, "a finite number")
        if value is not None:
            _require(predicate(value), prefix + name, value, expected)


_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
_UNIT = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_OPEN_UNIT = (lambda v: 0 < v < 1, "a number in (0, 1)")
_HALF_OPEN_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_PROBABILITY_MASS = (lambda v: 0 < v <= 1, "a number in (0, 1]")
_FINITE = (lambda v: True, "a finite number")
