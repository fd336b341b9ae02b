"""Which combine rules tolerate how many faulty sites: plain Python, so config checks need no torch."""

from __future__ import annotations


def tolerance_problem(rule: str, n: int, faulty: int, select: int | None = None) -> str | None:
    """Why `rule` cannot tolerate `faulty` Byzantine sites among `n`, or None when it can."""
    if rule in ("median", "trimmed_mean") and n < 2 * faulty + 1:
        return f"{rule} tolerates f faulty sites only with n ≥ 2f + 1 = {2 * faulty + 1} sites; there are {n}"
    if rule in ("krum", "multikrum") and n <= 2 * faulty + 2:
        return f"{rule} needs n > 2f + 2 = {2 * faulty + 2} sites to tolerate f = {faulty}; there are {n}"
    if rule == "multikrum" and select is not None and select > n - faulty:
        return f"multikrum can average at most n − f = {n - faulty} updates, not {select}"
    if rule == "mean" and faulty > 0:
        return "the weighted mean has no breakdown point: one faulty site moves it arbitrarily (use median, trimmed_mean or krum)"
    return None
