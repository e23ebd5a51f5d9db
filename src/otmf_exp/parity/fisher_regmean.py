"""placeholder."""

CASES = []
