"""The three approaches to the compute-optimal allocation side by side (Hoffmann et al. 2022
§3.1-3.3, Table 2): each on one line, and whether they agree. The one wording of both, for
`analyze`'s report and the study's summary."""

from __future__ import annotations

import numpy as np

from . import laws
from .allocation import NOTE_KEYS
from .common import fmt, format_interval


APPROACH_NUMBER = {"envelope": 1, "isoflop": 2, "parametric": 3}    # Hoffmann et al. 2022 §3.1-3.3
APPROACHES = {a: f"{'IsoFLOP' if a == 'isoflop' else a} (approach {n})" for a, n in APPROACH_NUMBER.items()}


def allocation_line(key: str, d: dict) -> str:
    """Report section KEY (allocation_<approach>: Allocation.to_dict()) on one line: exponents,
    intervals, identification. The one wording of it, for `analyze`'s summary and the study's."""
    approach = key.removeprefix("allocation_")
    line = (f"{APPROACHES.get(approach, approach)}: N_opt ∝ C^{fmt(d['a'], '.3f')} "
            f"{format_interval(d.get('a_interval')) or '(no interval)'}, D_opt ∝ C^{fmt(d['b'], '.3f')} "
            f"{format_interval(d.get('b_interval'))}  (Chinchilla ≈ {laws.CHINCHILLA_N_OPT_EXPONENT})")
    return line + ("  NOT IDENTIFIED (see the warning)" if d.get("extras", {}).get("unidentified") else "")


def allocation_block(key: str, d: dict) -> list[str]:
    """allocation_line and, indented under it, the section's notes (allocation.NOTE_KEYS)."""
    ex = d.get("extras", {})
    return [allocation_line(key, d)] + [f"    {ex[k]}" for k in NOTE_KEYS if ex.get(k)]


def allocation_agreement(allocs) -> dict | None:
    """Do the approaches agree on a? Hoffmann et al. 2022 (Table 2) set their three side by side; the
    rule here: each identified approach's a lies inside every other one's interval. None with fewer
    than two identified approaches. An approach without an interval (2 budgets) is checked against
    the others, but cannot check them (listed in no_interval)."""
    al = [a for a in allocs if not a.extras.get("unidentified")]
    if len(al) < 2:
        return None
    outside, no_interval = [], []
    for y in al:
        lo, hi = y.a_interval
        if not (np.isfinite(lo) and np.isfinite(hi)):
            no_interval.append(y.approach)
            continue
        outside += [f"{APPROACHES[x.approach]}'s a = {x.a:.3f} lies {'below' if x.a < lo else 'above'} "
                    f"{APPROACHES[y.approach]}'s interval [{lo:.3f}, {hi:.3f}]"
                    for x in al if x is not y and not lo <= x.a <= hi]
    return {"approaches": [a.approach for a in al], "agree": not outside, "outside": outside,
            "no_interval": no_interval, "rule": "each approach's a inside every other approach's interval"}


def agreement_line(g: dict) -> str:
    names = ", ".join(f"approach {APPROACH_NUMBER[a]}" for a in g["approaches"])
    head = (f"the approaches ({names}) agree on a: each point inside the others' intervals" if g["agree"]
            else f"the approaches ({names}) DISAGREE on a: " + "; ".join(g["outside"]))
    return head + (f" (no interval to check against: {', '.join(g['no_interval'])})" if g["no_interval"] else "")
