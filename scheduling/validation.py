"""Input rules shared by every entry point (HTTP, Client, CLI)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from scheduling.errors import InvalidInput, TooLarge

# Matched whole (fullmatch): with match, "$" also matches before a final newline.
VARIABLE_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
# Names that would let a task change how the interpreter or loader behaves.
RESERVED_VARIABLES = frozenset({"PATH", "PYTHONPATH", "BASH_ENV", "ENV", "IFS", "HOME"})
RESERVED_PREFIXES = ("LD_", "CHRONORAY_", "PYTHON")
SCRIPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VARIABLES = 64
MAX_VARIABLE_VALUE_BYTES = 4096


def validate_variables(variables: Mapping[str, str]) -> dict[str, str]:
    if len(variables) > MAX_VARIABLES:
        raise InvalidInput(f"at most {MAX_VARIABLES} variables", "variables")
    clean: dict[str, str] = {}
    for name, value in variables.items():
        where = f"variables.{name}"
        if not isinstance(name, str) or not VARIABLE_NAME.fullmatch(name):
            raise InvalidInput("name must match ^[A-Z_][A-Z0-9_]{0,63}$", where)
        if name in RESERVED_VARIABLES or name.startswith(RESERVED_PREFIXES):
            raise InvalidInput("reserved name", where)
        if not isinstance(value, str):
            raise InvalidInput("value must be a string", where)
        if "\x00" in value or "\n" in value or "\r" in value:
            raise InvalidInput("value must not contain NUL or newlines", where)
        if len(value.encode()) > MAX_VARIABLE_VALUE_BYTES:
            raise TooLarge(f"value over {MAX_VARIABLE_VALUE_BYTES} bytes", where)
        clean[name] = value
    return clean


def validate_script_name(name: str, field: str = "script") -> str:
    if not SCRIPT_NAME.fullmatch(name):
        raise InvalidInput("must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", field)
    return name
