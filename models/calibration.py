"""Calibration of the face-matching threshold: score statistics, exact binomial intervals, the operating point.

Owns the arithmetic (regularised incomplete beta, its inverse, Clopper–Pearson intervals, the equal error rate),
the rule that picks the operating threshold from genuine and impostor similarity scores, and the calibration
result file that `FaceEngine` reads its threshold from when the embedding model's manifest carries none.

The rule, stated once: the target is a false-accept rate (FAR) <= 0.1%. With n impostor pairs and no false accept,
the one-sided 95% upper bound on FAR is about 3/n (rule of three; exactly 1 - 0.05**(1/n)), so 0.1% can only be
*shown* with n >= ~3,000 independent impostor pairs (augmented variants of a photo are not independent of it and
do not count). When the data do not support it, the threshold is the larger
of (a) just above the highest impostor score seen (observed FAR = 0) and (b) the Gaussian-tail estimate of the
impostor distribution's 99.9th percentile (mean + 3.09 sd) — a model-based extrapolation, reported as such.
When they do, it is the lowest threshold whose Clopper–Pearson upper bound on FAR is <= the target.

Must never import scipy (not installed), read images, or log a score tied to a person.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

CALIBRATION_SCHEMA = 1
TARGET_FAR = 0.001
Z_999 = 3.090232306167813  # standard normal quantile at 0.999


class CalibrationError(Exception):
    """No threshold can be chosen or read (no scores, a missing or malformed calibration file)."""


# ---------------------------------------------------------------- incomplete beta and its inverse


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction for I_x(a, b) (Numerical Recipes, betacf)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise CalibrationError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError("a and b must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float, *, tol: float = 1e-12) -> float:
    """The q-quantile of Beta(a, b): bisection on the monotone I_x(a, b)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be in [0, 1]")
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for k successes in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def zero_failure_upper_bound(n: int, confidence: float = 0.95) -> float:
    """One-sided upper bound on a rate with 0 events in n trials: 1 - (1-confidence)**(1/n) (~3/n at 95%)."""
    return float(1.0 - (1.0 - confidence) ** (1.0 / n))


# ---------------------------------------------------------------- scores and the operating point


@dataclass(frozen=True, slots=True)
class RateAt:
    """A rate at one threshold: k of n, with its 95% Clopper–Pearson interval."""

    k: int
    n: int
    rate: float
    ci_low: float
    ci_high: float


def rate_at(scores: NDArray[np.floating], threshold: float, *, accept: bool = True) -> RateAt:
    """Fraction of scores >= threshold (accepted), with its interval."""
    n = int(scores.size)
    k = int((scores >= threshold).sum()) if accept else int((scores < threshold).sum())
    lo, hi = clopper_pearson(k, n)
    return RateAt(k=k, n=n, rate=k / n, ci_low=lo, ci_high=hi)


def equal_error_rate(genuine: NDArray[np.floating], impostor: NDArray[np.floating]) -> tuple[float, float]:
    """(EER, threshold): where the false-reject and false-accept rates cross, scanning every observed score."""
    candidates = np.unique(np.concatenate([genuine, impostor]))
    best = (2.0, float(candidates[0]))
    for t in candidates:
        frr = float((genuine < t).mean())
        far = float((impostor >= t).mean())
        gap = abs(frr - far)
        if gap < best[0]:
            best = (gap, float(t))
    if best[0] == 2.0:
        raise CalibrationError("no scores")
    t = best[1]
    eer = (float((genuine < t).mean()) + float((impostor >= t).mean())) / 2
    return eer, t


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    threshold: float
    rule: str  # "clopper_pearson_far" or "max_impostor_or_gaussian_tail"
    data_supports_target: bool
    max_impostor: float
    gaussian_tail: float
    how_chosen: str


def choose_threshold(
    genuine: NDArray[np.floating],
    impostor: NDArray[np.floating],
    independent_impostors: int,
    target_far: float = TARGET_FAR,
) -> OperatingPoint:
    """The operating threshold by the module's rule (see the module docstring).

    `independent_impostors` is how many of the impostor pairs are independent evidence (pairs of distinct original
    photos): augmented variants of one photo are strongly correlated with it, so they sharpen the picture of the
    score distribution but never count towards what the data can show.
    """
    if genuine.size == 0 or impostor.size == 0:
        raise CalibrationError("need both genuine and impostor scores")
    if not 0 < independent_impostors <= impostor.size:
        raise CalibrationError("independent impostor pairs must be between 1 and the number of impostor scores")
    n = independent_impostors
    max_imp = float(impostor.max())
    tail = float(impostor.mean() + Z_999 * impostor.std(ddof=1)) if impostor.size > 1 else max_imp
    just_above = float(np.nextafter(max_imp, np.inf))
    bound = zero_failure_upper_bound(n)
    if bound <= target_far and impostor.size == n:
        ordered = np.sort(impostor)[::-1]
        threshold = just_above
        # Lower the threshold through the impostor scores while the FAR upper bound stays within the target.
        for k in range(1, n):
            if clopper_pearson(k, n)[1] > target_far:
                break
            threshold = float(np.nextafter(ordered[k], np.inf))
        how = (
            f"lowest threshold whose 95% Clopper-Pearson upper bound on FAR is <= {target_far:.2%} "
            f"over {n} independent impostor pairs"
        )
        return OperatingPoint(threshold, "clopper_pearson_far", True, max_imp, tail, how)
    threshold = max(just_above, tail)
    how = (
        f"{n} independent impostor pairs cannot show FAR <= {target_far:.2%} (with zero false accepts the "
        f"one-sided 95% bound is {bound:.2%}, rule of three); threshold = max(just above the highest impostor "
        f"score, augmented included, {max_imp:.4f}; Gaussian-tail 99.9th percentile of the impostor scores "
        f"{tail:.4f})"
    )
    # Rounded up, so the stored number still rejects the highest impostor seen.
    return OperatingPoint(
        math.ceil(threshold * 10_000) / 10_000, "max_impostor_or_gaussian_tail", False, max_imp, tail, how
    )


@dataclass(frozen=True, slots=True)
class ScoreSet:
    """Similarity scores of one kind of pair (genuine or impostor) from one source (original or augmented)."""

    kind: str  # "genuine" | "impostor"
    source: str  # "original" | "augmented"
    scores: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    schema: int
    model: str
    model_sha256: str
    metric: str
    threshold: float
    target_far: float
    rule: str
    data_supports_target: bool
    how_chosen: str
    eer: float
    eer_threshold: float
    rows: tuple[dict[str, float | int | str], ...]  # per (kind of data) TAR/FAR with intervals
    calibrated_on: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


def summarise(
    sets: Sequence[ScoreSet],
    *,
    model: str,
    model_sha256: str,
    calibrated_on: str,
    target_far: float = TARGET_FAR,
) -> CalibrationResult:
    """Chooses the threshold on all pairs (original + augmented) and reports rates per source and overall."""

    def pick(kind: str, sources: set[str]) -> NDArray[np.float64]:
        vals = [s for ss in sets if ss.kind == kind and ss.source in sources for s in ss.scores]
        return np.asarray(vals, dtype=np.float64)

    everything = {"original", "augmented"}
    genuine_all, impostor_all = pick("genuine", everything), pick("impostor", everything)
    independent = pick("impostor", {"original"}).size or impostor_all.size
    point = choose_threshold(genuine_all, impostor_all, int(independent), target_far)
    eer, eer_t = equal_error_rate(genuine_all, impostor_all)
    rows: list[dict[str, float | int | str]] = []
    for label, sources in (("original", {"original"}), ("augmented", {"augmented"}), ("all", everything)):
        g, i = pick("genuine", sources), pick("impostor", sources)
        if g.size == 0 or i.size == 0:
            continue
        tar, far = rate_at(g, point.threshold), rate_at(i, point.threshold)
        e, _ = equal_error_rate(g, i)
        rows.append(
            {
                "pairs": label,
                "genuine": tar.n,
                "impostor": far.n,
                "tar": tar.rate,
                "tar_ci_low": tar.ci_low,
                "tar_ci_high": tar.ci_high,
                "far": far.rate,
                "far_ci_low": far.ci_low,
                "far_ci_high": far.ci_high,
                "eer": e,
                "genuine_min": float(g.min()),
                "impostor_max": float(i.max()),
            }
        )
    return CalibrationResult(
        schema=CALIBRATION_SCHEMA,
        model=model,
        model_sha256=model_sha256,
        metric="cosine",
        threshold=point.threshold,
        target_far=target_far,
        rule=point.rule,
        data_supports_target=point.data_supports_target,
        how_chosen=point.how_chosen,
        eer=eer,
        eer_threshold=eer_t,
        rows=tuple(rows),
        calibrated_on=calibrated_on,
    )


def markdown_table(result: CalibrationResult) -> str:
    """The table for docs/benchmarks.md."""
    lines = [
        f"Operating threshold (cosine): **{result.threshold:.4f}** — {result.how_chosen}. "
        f"EER {result.eer:.2%} at {result.eer_threshold:.4f} (all pairs).",
        "",
        "| pairs | genuine | impostor | TAR (95% CI) | FAR (95% CI) | EER | lowest genuine | highest impostor |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['pairs']} | {r['genuine']} | {r['impostor']} "
            f"| {float(r['tar']):.2%} ({float(r['tar_ci_low']):.2%}–{float(r['tar_ci_high']):.2%}) "
            f"| {float(r['far']):.2%} ({float(r['far_ci_low']):.2%}–{float(r['far_ci_high']):.2%}) "
            f"| {float(r['eer']):.2%} | {float(r['genuine_min']):.4f} | {float(r['impostor_max']):.4f} |"
        )
    lines += [
        "",
        "Augmented pairs (flip, ±8° rotation, darker, brighter variants of the same photos) are not independent of the "
        "originals: their intervals are optimistic and only the original pairs count towards what the data can show.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- where the threshold lives


def write_calibration_file(path: Path, result: CalibrationResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(asdict(result), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_calibration_file(path: Path) -> CalibrationResult:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("schema") != CALIBRATION_SCHEMA:
        raise CalibrationError(f"{path}: not a calibration file of schema {CALIBRATION_SCHEMA}")
    try:
        raw["rows"] = tuple(raw["rows"])
        return CalibrationResult(**raw)
    except (TypeError, KeyError) as exc:
        raise CalibrationError(f"{path}: malformed calibration file: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Threshold:
    value: float
    origin: str  # where it was read from, for logs and the CLI


def load_threshold(
    manifest_threshold: float | None, calibration_file: Path | None, model_sha256: str | None = None
) -> Threshold:
    """The operating threshold: the model manifest's calibrated block first, else the calibration file.

    A calibration file made for another model (sha256 differs) is refused: its threshold means nothing here.
    """
    if manifest_threshold is not None:
        return Threshold(manifest_threshold, "model manifest")
    if calibration_file is None:
        raise CalibrationError("no calibrated threshold: the model manifest has none and no calibration file given")
    result = read_calibration_file(calibration_file)
    if model_sha256 is not None and result.model_sha256 != model_sha256:
        raise CalibrationError(
            f"{calibration_file} was calibrated for model sha256 {result.model_sha256[:16]}…, "
            f"not {model_sha256[:16]}… (run `yibao calibrate face`)"
        )
    return Threshold(result.threshold, str(calibration_file))
