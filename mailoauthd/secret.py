"""The Secret type: a value that must never be printed, logged or put on a command line."""

from __future__ import annotations


class Secret:
    """
    A string that prints as '***'.

    Call `reveal()` only where the value leaves the process: an HTTP form field,
    a socket reply, the state file.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)
