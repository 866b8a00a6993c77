"""Direct references for the split certificates (spec 5d, 5e), written from the definitions and nothing else.

Every addition split ``alpha`` and removal split ``r`` within the budgets is enumerated; an input counts as
flipped when the spec's necessary condition holds for it. ``F*`` is the largest number of flipped correct inputs,
and the certified accuracy is ``(#correct - F*) / |T|``. Exponential, for tiny label counts and budgets only.
"""

from __future__ import annotations

import itertools

import numpy as np


def allocations(c: int, budget: int):
    """Every non-negative integer vector of length c with sum <= budget."""
    for v in itertools.product(range(budget + 1), repeat=c):
        if sum(v) <= budget:
            yield v

def rnn_ref(votes, y, e: int, model: str) -> float:
    """Spec 5d: need_i(alpha) = max(0, min_l (s_a - s_l + [a > l] - alpha_l)), flipped iff r_a >= need_i."""
    votes = np.asarray(votes)
    n, c = votes.shape
    a = [max(range(c), key=lambda lab: (votes[i][lab], lab)) for i in range(n)]
    correct = [i for i in range(n) if a[i] == y[i]]
    A = 0 if model == "deletion" else e
    R = 0 if model == "insertion" else e
    best = 0
    for alpha in allocations(c, A):
        for r in allocations(c, R):
            flips = 0
            for i in correct:
                ai = a[i]
                need = max(0, min(votes[i][ai] - votes[i][lab] + (ai > lab) - alpha[lab]
                                  for lab in range(c) if lab != ai))
                flips += r[ai] >= need
            best = max(best, flips)
    return (len(correct) - best) / n

def knn_ref(table, y, e: int, k: int, c: int, n: int, model: str) -> float:
    """Spec 5e: condition (*) checked literally for every N' in [0, min(k, e)], rho in [0, e], r_a.

    ``table`` holds each input's clean neighbour labels (its first ``n`` = all of them); counts read the first
    ``min(p, n)`` entries, 0 for ``p <= 0``. Insertion-only: no removals (r = rho = 0); deletion-only: no additions
    (alpha = N' = 0).
    """
    table = np.asarray(table)
    n_test = len(table)
    def count(i: int, lab: int, p: int) -> int:
        p = min(max(p, 0), n)
        return int(np.sum(table[i][:p] == lab))
    kk = min(k, n)
    a = []
    for i in range(n_test):
        v = [count(i, lab, kk) for lab in range(c)]
        a.append(max(range(c), key=lambda lab: (v[lab], lab)))
    correct = [i for i in range(n_test) if a[i] == y[i]]
    A = 0 if model == "deletion" else e
    R = 0 if model == "insertion" else e
    Nmax = 0 if model == "deletion" else min(k, e)
    Rho = 0 if model == "insertion" else e
    def holds(i, lab, al, ra):
        ai = a[i]
        for Np in range(Nmax + 1):
            for rho in range(Rho + 1):
                p = k - Np + rho
                if count(i, lab, p) - count(i, ai, p) + min(Np, al) + min(ra, rho) >= (ai > lab):
                    return True
        return False
    def need(i, alpha):
        for ra in range(R + 1):
            if any(holds(i, lab, alpha[lab], ra) for lab in range(c) if lab != a[i]):
                return ra
        return None
    best = 0
    for alpha in allocations(c, A):
        needs = [need(i, alpha) for i in correct]
        for r in allocations(c, R):
            flips = sum(1 for i, nd in zip(correct, needs, strict=True) if nd is not None and r[a[i]] >= nd)
            best = max(best, flips)
    return (len(correct) - best) / n_test
