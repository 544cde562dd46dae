"""Reports of bad records: where (file and line, or row index) and why; skip by default, fail under strict."""

from __future__ import annotations

import collections
import dataclasses

from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Problem:
    """One unusable record: ``location`` is ``"file:LINE"`` (1-based) or ``"file#INDEX"`` (0-based row)."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclasses.dataclass
class Report:
    """What a source held: rows read, records kept, problems found, records cut by truncation."""

    source: str
    kind: str
    rows: int = 0
    valid: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    truncated: int = 0

    def add(self, location: str, reason: str) -> None:
        self.problems.append(Problem(location, reason))

    def reasons(self) -> dict[str, int]:
        """Problem count per reason (the text before any parenthesis)."""
        return dict(collections.Counter(problem.reason.split(" (")[0] for problem in self.problems))

    def summary(self) -> str:
        line = f"{self.source}: {self.valid} valid {self.kind} records from {self.rows} rows"
        if self.problems:
            counts = ", ".join(f"{count} {reason}" for reason, count in self.reasons().items())
            line += f"; {len(self.problems)} skipped ({counts})"
        if self.truncated:
            line += f"; {self.truncated} truncated"
        return line

    def check(self, strict: bool) -> None:
        """Raise `UserError` when nothing survived, or under ``strict`` when anything is bad."""
        if strict and self.problems:
            first = "; ".join(map(str, self.problems[:3]))
            more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
            raise UserError(f"{len(self.problems)} bad records in {self.source} (strict): {first}{more}")
        if self.valid == 0:
            detail = f"; first problem: {self.problems[0]}" if self.problems else ""
            raise UserError(f"{self.source}: no valid {self.kind} records in {self.rows} rows{detail}")
