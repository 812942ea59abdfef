"""Scaling-law functional forms as pure numpy functions (no fitting, no I/O).

Naming is the project's everywhere: N = parameters, D = tokens, C = training FLOPs, loss in nats per
token. Every function broadcasts over array arguments, so a grid of (N, D) or a vector of parameter
samples can be evaluated in one call.
"""

from __future__ import annotations

import numpy as np

# Published constants, kept here so plots and reports cite one source.
# Kaplan et al. 2020, §1.2 eq. 1.1-1.3 and §6 (Figure 14): L(N) exponent for non-embedding N,
# L(D) exponent, L(C_min) exponent, and N_opt ∝ C^0.73.
KAPLAN_ALPHA_N = 0.076
KAPLAN_ALPHA_D = 0.095
KAPLAN_ALPHA_C = 0.050
KAPLAN_N_OPT_EXPONENT = 0.73
# Hoffmann et al. 2022 §3 (Table 2): all three approaches give N_opt ∝ C^a with a ≈ 0.5.
CHINCHILLA_N_OPT_EXPONENT = 0.5
# Hoffmann et al. 2022 §3 / App. D.2 eq. (10): unrounded Approach-3 fit.
HOFFMANN_PARAMS = {"E": 1.69337, "A": 406.401, "B": 410.723, "alpha": 0.339171, "beta": 0.284908}
# Chinchilla's training budget (Hoffmann et al. 2022 §4.1: 70B params x 1.4T tokens x 6).
CHINCHILLA_C = 5.76e23


def power_law(x, E, A, alpha):
    """Saturating power law L(x) = E + A x^-alpha.

    E is the irreducible loss (entropy of text under this tokenizer), A x^-alpha the reducible part.
    Kaplan et al. 2020 §1.2 write the pure forms L(N) = (N_c/N)^alpha_N (E = 0); the offset form is
    Hoffmann et al. 2022 §3.3's L(N, D) with one of the two terms held fixed.
    """
    x = np.asarray(x, dtype=float)
    return E + A * x ** (-np.asarray(alpha, dtype=float))


def loglinear(x, k, s):
    """y = k x^s: a straight line in log-log axes (allocation laws N_opt ∝ C^a, Hoffmann et al. 2022
    §3.1-3.2; Kaplan et al. 2020 §6.1 N_opt ∝ C^0.73)."""
    return k * np.asarray(x, dtype=float) ** s


def lr_law(N, c, k):
    """Peak learning rate of the tuned frontier, lr*(N) = c N^-k (Porian et al. 2024 §4 and Bi et
    al. 2024 "DeepSeek LLM" §3.1 fit such power laws through per-size optima). N is the suite's N."""
    return c * np.asarray(N, dtype=float) ** (-np.asarray(k, dtype=float))


def chinchilla(N, D, E, A, B, alpha, beta):
    """Hoffmann et al. 2022, §3.3 eq. (2): L(N, D) = E + A / N^alpha + B / D^beta."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    return E + A * N ** (-np.asarray(alpha, dtype=float)) + B * D ** (-np.asarray(beta, dtype=float))


def kaplan(N, D, N_c, D_c, alpha_N, alpha_D):
    """Kaplan et al. 2020, §1.2 eq. (1.5) / §4 eq. (4.1): L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D.

    Their fit (Table 2): N_c = 6.4e13, D_c = 1.8e13, alpha_N = 0.076, alpha_D = 0.103; N counts
    non-embedding parameters.
    """
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    alpha_N = np.asarray(alpha_N, dtype=float)
    alpha_D = np.asarray(alpha_D, dtype=float)
    return ((N_c / N) ** (alpha_N / alpha_D) + D_c / D) ** alpha_D


def learning_curve(t, E, A, alpha, t0=0.0):
    """Loss against tokens seen within one run: L(t) = E + A (t + t0)^-alpha.

    The same saturating power law as `power_law` (Kaplan et al. 2020 §5 eq. 5.6 fit L(N, S) with a
    power law in steps S); the optional shift t0 absorbs warm-up so that early points can be kept.
    Used to predict a run's final loss from a truncated curve (early stopping).
    """
    t = np.asarray(t, dtype=float)
    return power_law(t + t0, E, A, alpha)


def chinchilla_optimal(C, E, A, B, alpha, beta, flops_per_token_factor=6.0):
    """Compute-optimal (N_opt, D_opt) for the Chinchilla law under C = k N D (k = 6 by default).

    Hoffmann et al. 2022 §3.3 eq. (4): minimising E + A/N^alpha + B/D^beta subject to C = 6 N D gives
    G = (alpha A / (beta B))^(1/(alpha+beta)), N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
    a = beta/(alpha+beta), b = alpha/(alpha+beta). E does not enter; it is accepted so that a params
    dict can be splatted in.
    """
    C = np.asarray(C, dtype=float)
    a, b = chinchilla_optimal_exponents(alpha, beta)
    G = chinchilla_G(A, B, alpha, beta)
    base = C / flops_per_token_factor
    return G * base ** a, base ** b / G


def chinchilla_G(A, B, alpha, beta):
    """G = (alpha A / (beta B))^(1/(alpha+beta)) of Hoffmann et al. 2022 §3.3 eq. (4)."""
    alpha = np.asarray(alpha, dtype=float)
    beta = np.asarray(beta, dtype=float)
    # A degenerate bootstrap draw (an amplitude of inf or 0) gives NaN here, which the intervals
    # drop; numpy's warning about it would only reach the user's screen.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))


def chinchilla_optimal_exponents(alpha, beta):
    """(a, b) with N_opt ∝ C^a, D_opt ∝ C^b (Hoffmann et al. 2022 §3.3 eq. 4); a + b = 1."""
    s = np.asarray(alpha, dtype=float) + np.asarray(beta, dtype=float)
    return beta / s, alpha / s


def kaplan_optimal_exponents(alpha_N, alpha_D):
    """(a, b) with N_opt ∝ C^a, D_opt ∝ C^b for Kaplan's L(N, D) under C = k N D; a + b = 1.

    L = [(N_c/N)^x + D_c/D]^alpha_D with x = alpha_N/alpha_D (Kaplan et al. 2020 eq. 1.5) is
    smallest where the bracket is: with D = C/(k N), d/dN [N_c^x N^-x + k D_c N / C] = 0 gives
    N^(x+1) = x N_c^x C / (k D_c), so a = 1/(1+x) = alpha_D/(alpha_N+alpha_D): Hoffmann et al.'s
    exponents with the N term's exponent for alpha and the D term's for beta."""
    return chinchilla_optimal_exponents(alpha_N, alpha_D)


def kaplan_optimal(C, N_c, D_c, alpha_N, alpha_D, flops_per_token_factor=6.0):
    """Compute-optimal (N_opt, D_opt) for Kaplan's L(N, D) under C = k N D (kaplan_optimal_exponents
    derives it): N_opt = (x N_c^x C / (k D_c))^(1/(1+x)), x = alpha_N/alpha_D, D_opt = C/(k N_opt)."""
    C = np.asarray(C, dtype=float)
    x = np.asarray(alpha_N, dtype=float) / np.asarray(alpha_D, dtype=float)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):   # degenerate bootstrap draws: NaN
        N = np.exp((np.log(x) + x * np.log(N_c) + np.log(C / flops_per_token_factor) - np.log(D_c)) / (1 + x))
    return N, C / (flops_per_token_factor * N)


# The parametric forms approach 3 may use (analysis.allocation.from_parametric): the law, its
# compute-optimal (N, D) and exponents, and the parameters the exponents take.
PARAMETRIC = {"chinchilla": (chinchilla, chinchilla_optimal, chinchilla_optimal_exponents, ("alpha", "beta")),
              "kaplan": (kaplan, kaplan_optimal, kaplan_optimal_exponents, ("alpha_N", "alpha_D"))}
