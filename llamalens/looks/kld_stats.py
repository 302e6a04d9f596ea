"""The statistics `llama-perplexity --kl-divergence` prints, from per-token values (pure, no llama.cpp).

Per scored token t of a model Q against a base model:
    nll_q[t], nll_base[t]   negative log-probability of the actual token under each model
    kld[t]                  KL(base ‖ Q) over the whole vocabulary
    same_top[t]             whether both models' most likely token is the same
    Δp[t] = p_Q − p_base    of the actual token (p = exp(−nll))

and the figures, computed as llama.cpp's tools/perplexity/perplexity.cpp computes them:
    mean ± uncertainty      f = Σx / n, ± sqrt((Σx² / n − f²) / (n − 1))   (0 when n <= 10)
    PPL(Q), PPL(base)       exp(mean nll) ± PPL · uncertainty of the mean nll
    Cor(ln PPL(Q), ln PPL(base))   cov / (unc_q · unc_base), cov = (Σ nll_q nll_base / n − means' product) / (n − 1)
    ln(PPL(Q)/PPL(base))    mean nll_q − mean nll_base ± sqrt(unc_q² + unc_base² − 2 cov)
    PPL(Q)/PPL(base)        exp of that ± ratio · its uncertainty
    PPL(Q) − PPL(base)      ± sqrt(unc_PPL(Q)² + unc_PPL(base)² − 2 PPL(Q) PPL(base) cov)
    percentiles             of the sorted values, linear between neighbours at fraction · (n − 1); the median the
                            mean of the two middle values when n is even (the same thing)
    RMS Δp                  sqrt(mean Δp²) ± 0.5 / RMS · uncertainty of mean Δp²
    same top p              share of tokens ± sqrt(p (1 − p) / (n − 1))
The tool prints these only from 100 tokens on; here they are given for any n >= 1 (NaN where undefined).
"""

from __future__ import annotations

import math

import numpy as np

# (key suffix, fraction) of the percentiles the tool prints, highest first
KLD_PERCENTILES = (("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("median", 0.5), ("p10", 0.10),
                   ("p5", 0.05), ("p1", 0.01), ("p0_1", 0.001))
DP_PERCENTILES = (("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p75", 0.75), ("median", 0.5),
                  ("p25", 0.25), ("p10", 0.10), ("p5", 0.05), ("p1", 0.01), ("p0_1", 0.001))


def mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's mean and its uncertainty (the standard error; 0 with 10 values or fewer)."""
    n = len(x)
    if n < 1:
        return math.nan, math.nan
    f = float(np.sum(x, dtype=np.float64)) / n
    var = float(np.sum(np.square(x, dtype=np.float64))) / n - f * f
    return f, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """The value at `fraction` of the sorted values, linear between neighbours (the tool's percentile())."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (n - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, n - 1)])


def _spread(prefix: str, values: np.ndarray, points) -> dict:
    """max, the percentiles and min of `values` as {prefix_max: ..., prefix_p99: ..., prefix_min: ...}."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    out = {f"{prefix}_max": float(v[-1]) if len(v) else math.nan}
    out.update({f"{prefix}_{key}": percentile(v, f) for key, f in points})
    out[f"{prefix}_min"] = float(v[0]) if len(v) else math.nan
    return out


def kld_statistics(nll_q, nll_base, kld, same_top) -> dict:
    """Every figure of llama-perplexity --kl-divergence's summary (module docstring), by name."""
    nll_q, nll_base = np.asarray(nll_q, dtype=np.float64), np.asarray(nll_base, dtype=np.float64)
    kld, same = np.asarray(kld, dtype=np.float64), np.asarray(same_top, dtype=bool)
    n = len(kld)
    lq, uq = mean_and_uncertainty(nll_q)
    lb, ub = mean_and_uncertainty(nll_base)
    cov = (float(np.dot(nll_q, nll_base)) / n - lq * lb) / (n - 1) if n >= 10 else 0.0
    ppl_q, ppl_b = math.exp(lq) if n else math.nan, math.exp(lb) if n else math.nan
    ln_ratio, ln_ratio_unc = lq - lb, math.sqrt(max(uq * uq + ub * ub - 2 * cov, 0.0)) if n else math.nan
    ratio = math.exp(ln_ratio) if n else math.nan
    dp = np.exp(-nll_q) - np.exp(-nll_base)
    dp2_mean, dp2_unc = mean_and_uncertainty(dp * dp)
    rms = math.sqrt(dp2_mean) if n else math.nan
    same_p = float(same.mean()) if n else math.nan
    out = {
        "tokens": n,
        "ppl_q": ppl_q, "ppl_q_error": ppl_q * uq, "ppl_base": ppl_b, "ppl_base_error": ppl_b * ub,
        "ln_ppl_correlation": cov / (uq * ub) if uq > 0 and ub > 0 else math.nan,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_error": ln_ratio_unc,
        "ppl_ratio": ratio, "ppl_ratio_error": ratio * ln_ratio_unc,
        "ppl_diff": ppl_q - ppl_b,
        "ppl_diff_error": math.sqrt(max((ppl_q * uq) ** 2 + (ppl_b * ub) ** 2 - 2 * ppl_q * ppl_b * cov, 0.0))
        if n else math.nan,
    }
    out["kld_mean"], out["kld_error"] = mean_and_uncertainty(kld)
    out.update(_spread("kld", kld, KLD_PERCENTILES))
    out["dp_mean"], out["dp_error"] = mean_and_uncertainty(dp)
    out.update(_spread("dp", dp, DP_PERCENTILES))
    out["dp_rms"] = rms
    out["dp_rms_error"] = 0.5 / rms * dp2_unc if rms > 0 else 0.0  # no Δp at all: exactly 0
    out["same_top"] = same_p
    out["same_top_error"] = math.sqrt(same_p * (1 - same_p) / (n - 1)) if n > 1 else math.nan
    return out


# (label as llama-perplexity prints it, key, unit): the order of its summary; "%" values print ×100
LLAMA_PERPLEXITY_LINES = (
    ("Mean PPL(Q)", "ppl_q", ""), ("Mean PPL(base)", "ppl_base", ""),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "ln_ppl_correlation", "%"),
    ("Mean ln(PPL(Q)/PPL(base))", "ln_ppl_ratio", ""), ("Mean PPL(Q)/PPL(base)", "ppl_ratio", ""),
    ("Mean PPL(Q)-PPL(base)", "ppl_diff", ""),
    ("Mean    KLD", "kld_mean", ""), ("Maximum KLD", "kld_max", ""), ("99.9%   KLD", "kld_p99_9", ""),
    ("99.0%   KLD", "kld_p99", ""), ("95.0%   KLD", "kld_p95", ""), ("90.0%   KLD", "kld_p90", ""),
    ("Median  KLD", "kld_median", ""), ("10.0%   KLD", "kld_p10", ""), (" 5.0%   KLD", "kld_p5", ""),
    (" 1.0%   KLD", "kld_p1", ""), (" 0.1%   KLD", "kld_p0_1", ""), ("Minimum KLD", "kld_min", ""),
    ("Mean    Δp", "dp_mean", "%"), ("Maximum Δp", "dp_max", "%"), ("99.9%   Δp", "dp_p99_9", "%"),
    ("99.0%   Δp", "dp_p99", "%"), ("95.0%   Δp", "dp_p95", "%"), ("90.0%   Δp", "dp_p90", "%"),
    ("75.0%   Δp", "dp_p75", "%"), ("Median  Δp", "dp_median", "%"), ("25.0%   Δp", "dp_p25", "%"),
    ("10.0%   Δp", "dp_p10", "%"), (" 5.0%   Δp", "dp_p5", "%"), (" 1.0%   Δp", "dp_p1", "%"),
    (" 0.1%   Δp", "dp_p0_1", "%"), ("Minimum Δp", "dp_min", "%"), ("RMS Δp", "dp_rms", "%"),
    ("Same top p", "same_top", "%"),
)
# the keys that carry a ±, and the key of their uncertainty
WITH_ERROR = {"ppl_q": "ppl_q_error", "ppl_base": "ppl_base_error", "ln_ppl_ratio": "ln_ppl_ratio_error",
              "ppl_ratio": "ppl_ratio_error", "ppl_diff": "ppl_diff_error", "kld_mean": "kld_error",
              "dp_mean": "dp_error", "dp_rms": "dp_rms_error", "same_top": "same_top_error"}


def statistic_lines(s: dict) -> list[tuple[str, str]]:
    """(label, value text) of every figure, in the tool's order and units (percent where it prints percent)."""
    out = []
    for label, key, unit in LLAMA_PERPLEXITY_LINES:
        scale, digits = (100.0, 3) if unit else (1.0, 6)
        if key == "ln_ppl_correlation":
            digits = 2
        text = f"{s[key] * scale:.{digits}f}"
        if key in WITH_ERROR:
            text += f" ± {s[WITH_ERROR[key]] * scale:.{digits}f}"
        out.append((label.strip(), text + (" %" if unit else "")))
    return out
