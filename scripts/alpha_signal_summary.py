"""Per-run summary of the alpha signal: does alpha matter, which way, and does the policy follow?

Reads the run directories of a sweep (each with ``report.json`` and ``metrics.jsonl``) and prints, per run: its label
(``label`` or the policy preset), seed, the probe summary (``report.json``'s ``alpha_signal`` block: probes,
significant windows, mean slope on the next batch and on the step's own batch, the sign agreement), the policy's
alpha at the start and the end, its drift, whether the drift follows the sign of the probe's mean slope, and the
distilled student's Rouge-L. Writes the table as markdown (and JSON with ``--json``).

    python scripts/alpha_signal_summary.py multirun/tiny_signal --out results/tiny_signal/alpha_signal.md

With ``--reference LABEL`` it also compares every other label with that one on the student's Rouge-L over the
seeds they share: a Friedman test over all labels first (SciPy, when installed), then paired differences with
Holm-corrected t intervals (``arkd.evaluation.stats``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arkd.run_log import read_metrics


def _rows(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if r.get("split", "train") == "train"]


def summarize_run(run: Path) -> dict | None:
    report_path = run / "report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    cfg = report.get("config", {})
    label = cfg.get("label") or report.get("strategy") or cfg.get("policy", {}).get("_target_", "?").split(".")[-1]
    rows = _rows(run / "metrics.jsonl")
    alphas = [r["alpha_mean"] for r in rows if r.get("alpha_mean") is not None]
    k = max(1, len(alphas) // 5)
    signal = report.get("alpha_signal") or {}
    slope = signal.get("mean_slope")
    drift = signal.get("policy_alpha_drift")
    follows = None
    if slope is not None and drift is not None and abs(drift) >= 0.02:
        follows = (slope > 0) == (drift > 0)
    after = report.get("results", {}).get("student_after", {}).get("rougeL", {}).get("mean")
    before = report.get("results", {}).get("student_before", {}).get("rougeL", {}).get("mean")
    return {
        "run": str(run),
        "label": label,
        "seed": cfg.get("seed"),
        "probes": signal.get("probes"),
        "windows": signal.get("windows"),
        "significant_windows": signal.get("significant_windows"),
        "sign_agreement": signal.get("sign_agreement"),
        "mean_slope": slope,
        "slope_t": signal.get("slope_t"),
        "mean_slope_same": signal.get("mean_slope_same"),
        "alpha_first": sum(alphas[:k]) / k if alphas else None,
        "alpha_last": sum(alphas[-k:]) / k if alphas else None,
        "alpha_mean": sum(alphas) / len(alphas) if alphas else None,
        "policy_alpha_drift": drift,
        "follows_probe_sign": follows,
        "rougeL_after": after,
        "rougeL_before": before,
    }


def _fmt(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def markdown(items: list[dict]) -> str:
    head = (
        "| run | seed | probes | significant windows | mean slope (next) | t | mean slope (same) | alpha first -> last"
        " | drift | follows sign | Rouge-L after |"
    )
    lines = [head, "|" + "---|" * 11]
    for it in items:
        lines.append(
            f"| {it['label']} | {it['seed']} | {_fmt(it['probes'], 'd')} | "
            f"{_fmt(it['significant_windows'], 'd')} / {_fmt(it['windows'], 'd')} | {_fmt(it['mean_slope'], '+.2e')} | "
            f"{_fmt(it['slope_t'], '+.2f')} | {_fmt(it['mean_slope_same'], '+.2e')} | "
            f"{_fmt(it['alpha_first'], '.3f')} -> {_fmt(it['alpha_last'], '.3f')} | "
            f"{_fmt(it['policy_alpha_drift'], '+.3f')} | {_fmt(it['follows_probe_sign'], '')} | "
            f"{_fmt(it['rougeL_after'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def compare(items: list[dict], reference: str) -> str:
    """Friedman over labels x shared seeds, then Holm-corrected paired intervals against ``reference``
    (arkd.evaluation.stats: the same functions as arkd-compare)."""
    from arkd.evaluation.stats import friedman, holm_levels, paired_difference, paired_t_p_value

    scores: dict[str, dict] = {}
    for it in items:
        if it["rougeL_after"] is not None:
            scores.setdefault(str(it["label"]), {})[it["seed"]] = it["rougeL_after"]
    if reference not in scores:
        raise SystemExit(f"alpha_signal_summary: --reference {reference!r} is not a label here ({sorted(scores)})")
    labels = sorted(scores)
    seeds = sorted(set.intersection(*(set(v) for v in scores.values())))
    lines = [f"Rouge-L over seeds {seeds} (paired by seed), reference `{reference}`.", ""]
    if len(labels) >= 3 and len(seeds) >= 2:
        test = friedman([[scores[label][s] for label in labels] for s in seeds])
        lines.append(
            f"Friedman over {len(labels)} labels x {len(seeds)} seeds: chi^2 = {test.statistic:.2f}, "
            f"p = {test.p_value:.3f}."
        )
    others = [label for label in labels if label != reference]
    pairs = {label: ([scores[label][s] for s in seeds], [scores[reference][s] for s in seeds]) for label in others}
    p_values = [paired_t_p_value(*pairs[label]) for label in others]
    levels = dict(zip(others, holm_levels(p_values, 0.05)))
    p_of = dict(zip(others, p_values))
    lines += ["", "| label - reference | mean | sd | p | Holm level | corrected interval |", "|---" * 6 + "|"]
    for label in sorted(others, key=p_of.__getitem__):
        d = paired_difference(*pairs[label])
        wide = paired_difference(*pairs[label], confidence=1 - levels[label])
        lines.append(
            f"| {label} - {reference} | {d.mean:+.2f} | {d.std:.2f} | {p_of[label]:.3f} | {levels[label]:.4f} | "
            f"[{wide.low:+.2f}, {wide.high:+.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep or run directories (searched for report.json)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--reference", default=None, help="compare every label with this one (Rouge-L, paired)")
    args = parser.parse_args()
    runs = sorted({p.parent for root in args.sweeps for p in root.rglob("report.json")})
    items = [it for it in (summarize_run(run) for run in runs) if it is not None]
    if not items:
        raise SystemExit(f"alpha_signal_summary: no report.json under {', '.join(map(str, args.sweeps))}")
    items.sort(key=lambda it: (str(it["label"]), it["seed"] if it["seed"] is not None else -1))
    text = markdown(items)
    if args.reference is not None:
        text += "\n" + compare(items, args.reference)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(items, indent=2) + "\n")


if __name__ == "__main__":
    main()
