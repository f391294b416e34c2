"""One error type for bad user input: the CLI prints its message as one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (paths, names, numbers, files). The message names the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(message)
        self.problem = problem
        self.fix = fix
