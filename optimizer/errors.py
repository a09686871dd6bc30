"""The one exception type for mistakes a user can make and fix, and how to recognise a full disk."""

import errno


class UserError(Exception):
    """A problem with the user's input: the message names it and says how to fix it.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


def disk_full(error: BaseException | None) -> BaseException | None:
    """The error, among ``error`` and those it was raised from or while handling, that means a
    full disk (None if none does)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if any(text in str(error) for text in ("database or disk is full", "No space left on device")):
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: BaseException) -> str | None:
    """One line for a full disk behind ``error`` (None if there is none)."""
    full = disk_full(error)
    if full is None:
        return None
    reason = str(getattr(full, "orig", None) or full).strip().splitlines()[0]
    if isinstance(full, OSError) and full.filename:
        what = f"the disk holding {full.filename} is full"
    elif "database or disk is full" in reason:
        what = "the disk holding the study's database is full"
    else:
        what = "the disk is full"
    return f"{what} ({reason}); free some space and run the same command again (a study resumes where it stopped)"
