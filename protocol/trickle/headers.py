"""Header names and special seq values of the trickle protocol (protocol/trickle.md §1.4-1.5)."""

SEQ = "Lp-Trickle-Seq"
LATEST = "Lp-Trickle-Latest"
CLOSED = "Lp-Trickle-Closed"
RESET = "Lp-Trickle-Reset"
EXPECT_CONTENT = "Expect-Content"

CLOSED_VALUE = "terminated"

NEXT_SEQ = -1
"""GET: the segment that will be written next; POST: the next free seq."""
LATEST_SEQ = -2
"""GET: the most recently started segment (ai-runner's subscribers start here)."""


def parse_int(value: str | None, default: int) -> int:
    """A header as an int, `default` when absent or malformed (clients must not crash on it)."""
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return default
