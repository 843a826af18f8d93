""""What the federation added": the run report's comparison a head teacher can read.

Per round, the federated DP model's accuracy on the public test split and on the schools' held-out
students (``synthetic-indomain``, simulation only) from ``metrics.jsonl``, against

    (a) the starting model (round 0: the pre-trained model, scored before any school trained),
    (b) one central model on all the schools' data pooled, no privacy, and
    (c) each school training alone under the same DP, and
    (d) the same federation with the DP noise switched off (what the privacy cost),

(b), (c) and (d) from ``references.json`` when the run computed them (`fedfer simulate --references`,
simulations/references.py). This module derives the rows and lines from plain data; server/report.py
writes them, server/plots.py draws them.

Which federated model is compared: the one the schools get. With `evaluation.keep_best` that is the round kept
as ``checkpoints/best.pt`` (server/best_round.py), which need not be the last round; the table then shows the
last round too, and the headline compares the kept one. (d) is trained round by round, so each federation row is
compared with (d) *at the same round* (its curve), never with (d)'s last round.

references.json (format ``fedfer-references/1``)::

    {"benchmarks": {"public": NAME, "indomain": NAME},
     "start": {"scores": S}, "federated": {"round": R, "scores": S}, "best": {"round": B, "scores": S},
     "central": {"epochs": E, "frames": N, "scores": S},
     "alone": {school: {"students": N, "privacy": {"epsilon": ε, "delta": δ, ...}, "scores": S}},
     "noise-free": {"rounds": R, "schools": N, "curve": [{"round": r, NAME: accuracy, ..., "scores": S}], "scores": S}}

with S = {benchmark: {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "n"}, "own-school": {...},
"per-school": {index: {...}}} (fractions in 0..1). "federated" is the last round's model, "best" the model in
checkpoints/best.pt (absent when there is none); a curve point's "scores" (with the CIs) is absent in files
written before session 24, which have its accuracies only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from shared_models.wording import counted

FORMAT = "fedfer-references/1"
FILE = "references.json"
INDOMAIN = "synthetic-indomain"
MAX_BYTES = 16 << 20

#: plain-language names, also the plot's legend
START = "Starting model (public photos only, no school data)"
FEDERATION = "Federation (schools train privately together)"
CENTRAL = "All schools' data pooled in one place, no privacy (upper reference)"
NOISE_FREE = "The same federation without privacy (DP noise off)"
BEST_ALONE = "Best single school training alone (same privacy)"
EACH_ALONE = "Each school alone (same privacy): lowest to highest"


def read_references(run_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    """``<run_dir>/references.json`` or None (absent, or unreadable: then a note)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError("too large")
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        notes.append(f"{FILE}: unreadable ({exc}); the reference models are not shown")
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        notes.append(f"{FILE}: not a {FORMAT} file; the reference models are not shown")
        return None
    return record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scores(entry: Any, bench: str | None) -> dict[str, Any] | None:
    """The score dict of `bench` in a references entry (or a metrics evaluation), if it has an accuracy."""
    if not bench or not isinstance(entry, Mapping):
        return None
    scores = entry.get("scores", entry)
    metrics = scores.get(bench) if isinstance(scores, Mapping) else None
    return dict(metrics) if isinstance(metrics, Mapping) and _number(metrics.get("accuracy")) else None


def benchmarks(rounds: Mapping[int, Mapping[str, Any]], references: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(public benchmark, in-domain benchmark): the first evaluated benchmark that is not the schools'
    held-out students, and ``synthetic-indomain`` when evaluated."""
    names: list[str] = []
    for r in sorted(rounds):
        for name in (rounds[r].get("evaluation") or {}):
            if name not in names:
                names.append(name)
    if references and isinstance(references.get("benchmarks"), Mapping):
        names += [str(v) for v in references["benchmarks"].values() if str(v) not in names]
    public = next((n for n in names if n != INDOMAIN), None)
    return public, (INDOMAIN if INDOMAIN in names else None)


def curves(rounds: Mapping[int, Mapping[str, Any]], bench: str | None) -> dict[str, list[Any]]:
    """round, accuracy, ci_low, ci_high of `bench` for every round that evaluated it (round 0 included)."""
    out: dict[str, list[Any]] = {"round": [], "accuracy": [], "ci_low": [], "ci_high": []}
    for r in sorted(rounds):
        m = _scores(rounds[r].get("evaluation"), bench)
        if m is None:
            continue
        out["round"].append(r)
        out["accuracy"].append(float(m["accuracy"]))
        out["ci_low"].append(float(m["accuracy_ci_low"]) if _number(m.get("accuracy_ci_low")) else None)
        out["ci_high"].append(float(m["accuracy_ci_high"]) if _number(m.get("accuracy_ci_high")) else None)
    return out


def noise_free_curve(references: Mapping[str, Any] | None, bench: str | None) -> dict[str, list[float]]:
    """(d)'s accuracy on `bench` after each of its rounds (references.json "noise-free" → "curve")."""
    quiet = (references or {}).get("noise-free")
    points = quiet.get("curve") if isinstance(quiet, Mapping) else None
    out: dict[str, list[float]] = {"round": [], "accuracy": []}
    for point in points if isinstance(points, list) else []:
        if isinstance(point, Mapping) and _number(point.get("round")) and bench and _number(point.get(bench)):
            out["round"].append(float(point["round"]))
            out["accuracy"].append(float(point[bench]))
    return out


def _alone(references: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    alone = (references or {}).get("alone")
    return {str(k): v for k, v in alone.items() if isinstance(v, Mapping)} if isinstance(alone, Mapping) else {}


def _alone_epsilon(entry: Mapping[str, Any]) -> float | None:
    privacy = entry.get("privacy")
    eps = privacy.get("epsilon") if isinstance(privacy, Mapping) else None
    return float(eps) if _number(eps) else None


def noise_free_at(references: Mapping[str, Any] | None, round_: int, bench: str | None) -> dict[str, Any] | None:
    """(d)'s score on `bench` after its round `round_` (its curve; the final "scores" for its last round), or None
    when (d) did not record that round. A curve point from before session 24 has the accuracy without its CI."""
    quiet = (references or {}).get("noise-free")
    if not isinstance(quiet, Mapping) or not bench:
        return None
    points = quiet.get("curve") if isinstance(quiet.get("curve"), list) else []
    point = next((p for p in points if isinstance(p, Mapping) and p.get("round") == round_), {})
    full = _scores(point, bench) if isinstance(point.get("scores"), Mapping) else None
    if full is None and quiet.get("rounds") == round_:   # (d)'s last round: its final scores are that round's
        full = _scores(quiet, bench)
    if full is None and _number(point.get(bench)):
        full = {"accuracy": float(point[bench])}
    return full


def rows(rounds: Mapping[int, Mapping[str, Any]], references: Mapping[str, Any] | None,
         federation_epsilon: float | None, kept_round: int | None = None) -> list[dict[str, Any]]:
    """The comparison table: one dict per model with ``label``, ``public`` and ``indomain`` (score dicts
    or None), ``privacy`` (text), ``key`` (start | federation | federation-last | noise-free | noise-free-last |
    central | best-alone | each-alone) and, for the federation and (d), ``round``.

    `kept_round`: the round checkpoints/best.pt holds (None: no best.pt, the schools get the last round). The
    ``federation`` row is the model the schools get; when that is not the last round, ``federation-last`` shows
    the last. Each (d) row is (d) after the same round as its federation row."""
    public, indomain = benchmarks(rounds, references)
    evaluated = [r for r in sorted(rounds) if _scores(rounds[r].get("evaluation"), public or indomain)]
    out: list[dict[str, Any]] = []
    start = rounds[0].get("evaluation") if 0 in evaluated else (references or {}).get("start")
    if start is not None:
        out.append({"key": "start", "label": START + (" — round 0" if 0 in evaluated else ""),
                    "public": _scores(start, public), "indomain": _scores(start, indomain), "privacy": "no school data used"})
    last = max((r for r in evaluated if r > 0), default=None)
    if last is None:
        return out + _reference_rows(references, public, indomain)
    kept = kept_round if kept_round in evaluated and kept_round != 0 else None
    given = kept if kept is not None else last   # the model the schools get
    eps = f"ε ≤ {federation_epsilon:.2f} per school" if federation_epsilon is not None else "DP (see the privacy table)"
    if kept is None:
        label = f"{FEDERATION} — after round {last}"
    elif kept == last:
        label = f"{FEDERATION} — after round {last}, the last and the best on the public benchmarks (checkpoints/best.pt)"
    else:
        label = f"{FEDERATION} — after round {kept}, the best on the public benchmarks (checkpoints/best.pt)"
    federated = [("federation", given, label)]
    if given != last:
        federated.append(("federation-last", last, f"{FEDERATION} — after round {last}, the last round"))
    for key, round_, text in federated:
        out.append({"key": key, "label": text, "round": round_, "public": _scores(rounds[round_].get("evaluation"), public),
                    "indomain": _scores(rounds[round_].get("evaluation"), indomain), "privacy": eps})
    for key, round_, _ in federated:   # (d) after the same round: like with like
        quiet = {"public": noise_free_at(references, round_, public), "indomain": noise_free_at(references, round_, indomain)}
        if quiet["public"] or quiet["indomain"]:
            out.append({"key": key.replace("federation", "noise-free"), "label": f"{NOISE_FREE} — after round {round_}",
                        "round": round_, **quiet, "privacy": "none (what the privacy cost)"})
    return out + _reference_rows(references, public, indomain)


def _reference_rows(references: Mapping[str, Any] | None, public: str | None, indomain: str | None) -> list[dict[str, Any]]:
    """(b) and (c)'s rows: trained to their end, they have no round to match."""
    out: list[dict[str, Any]] = []
    central = (references or {}).get("central")
    if isinstance(central, Mapping):
        epochs = central.get("epochs")
        label = CENTRAL + (f" — {counted(int(epochs), 'epoch')}" if _number(epochs) else "")
        out.append({"key": "central", "label": label, "public": _scores(central, public),
                    "indomain": _scores(central, indomain), "privacy": "none (not possible for real schools)"})
    return out + _alone_rows(_alone(references), public, indomain)


def _alone_rows(alone: Mapping[str, Mapping[str, Any]], public: str | None, indomain: str | None) -> list[dict[str, Any]]:
    scored = {sid: entry for sid, entry in alone.items() if _scores(entry, indomain or public)}
    if not scored:
        return []
    best_id = max(scored, key=lambda sid: _scores(scored[sid], indomain or public)["accuracy"])  # type: ignore[index]
    best = scored[best_id]
    eps = _alone_epsilon(best)
    students = best.get("students")
    out = [{"key": "best-alone", "label": f"{BEST_ALONE} — {best_id}" + (f", {counted(int(students), 'student')}" if _number(students) else ""),
            "public": _scores(best, public), "indomain": _scores(best, indomain),
            "privacy": f"ε = {eps:.2f}" if eps is not None else "DP"}]
    if len(scored) > 1:
        def span(bench: str | None) -> dict[str, Any] | None:
            values = [m["accuracy"] for m in (_scores(e, bench) for e in scored.values()) if m]
            return {"accuracy": min(values), "accuracy_high": max(values)} if values else None

        epsilons = [e for e in (_alone_epsilon(x) for x in scored.values()) if e is not None]
        out.append({"key": "each-alone", "label": f"{EACH_ALONE} ({len(scored)} schools)",
                    "public": span(public), "indomain": span(indomain),
                    "privacy": f"ε ≤ {max(epsilons):.2f}" if epsilons else "DP"})
    return out


def per_school(references: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """For each school that also trained alone: its held-out students' accuracy alone, in the federation (the
    model the schools get: references.json "best" when the run kept checkpoints/best.pt, else "federated", the
    last round; ``federation_round`` says which) and with its own last model ("own", when the school kept one)."""
    delivered = federated_model(references)
    federated = delivered.get("scores") if isinstance(delivered.get("scores"), Mapping) else {}
    by_index = federated.get("per-school")
    kept = (references or {}).get("own")
    kept = kept if isinstance(kept, Mapping) else {}
    out = []
    for sid, entry in sorted(_alone(references).items()):
        own = _own_school(entry)
        if own is None:
            continue
        index = sid.rsplit("-", 1)[-1].lstrip("0") or "0"
        fed = by_index.get(index) if isinstance(by_index, Mapping) else None
        out.append({"school": sid, "students": entry.get("students"), "alone": own,
                    "federation": fed if isinstance(fed, Mapping) and _number(fed.get("accuracy")) else None,
                    "federation_round": delivered.get("round") if _number(delivered.get("round")) else None,
                    "own-model": _own_school(kept.get(sid))})
    return out


def federated_model(references: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """references.json's entry for the federated model the schools get: "best" (checkpoints/best.pt) if the run
    kept one, else "federated" (the last round); {} when neither is there."""
    for key in ("best", "federated"):
        entry = (references or {}).get(key)
        if isinstance(entry, Mapping):
            return entry
    return {}


def _own_school(entry: Any) -> Mapping[str, Any] | None:
    """An entry's score on its school's own held-out students (`scores` → `own-school`), if recorded and sane."""
    scores = entry.get("scores") if isinstance(entry, Mapping) else None
    mine = scores.get("own-school") if isinstance(scores, Mapping) else None
    return mine if isinstance(mine, Mapping) and _number(mine.get("accuracy")) else None


def headline(table: list[dict[str, Any]]) -> str:
    """One sentence: what the federation added on the schools' own kind of faces (or the public test). It is
    about the model the schools get (the ``federation`` row: checkpoints/best.pt when the run kept one); when
    that is not the last round, a second sentence says what the last round scored."""
    by = {row["key"]: row for row in table}
    fed = by.get("federation")
    if fed is None:
        return ""
    which = "indomain" if fed.get("indomain") else "public"
    where = "on the schools' own kind of faces (students never used in training)" if which == "indomain" else "on the public test photos"
    last = by.get("federation-last")
    subject = "The federation" if last is None else (
        f"The federation's model in checkpoints/best.pt (round {fed['round']}, the best on the public benchmarks)")
    parts = [f"{subject} recognises {100 * fed[which]['accuracy']:.1f} % of expressions {where}"]
    for key, text in (("start", "the starting model"), ("best-alone", "the best school alone"),
                      ("noise-free", "the same federation without privacy"),
                      ("central", "pooling all data without privacy")):
        other = (by.get(key) or {}).get(which)
        if other:
            diff = 100 * (fed[which]["accuracy"] - other["accuracy"])
            same_round = f" after round {fed['round']}" if key == "noise-free" and last is not None else ""
            parts.append(f"{diff:+.1f} points against {text}{same_round} ({100 * other['accuracy']:.1f} %)")
    sentence = parts[0] + (": " + "; ".join(parts[1:]) if len(parts) > 1 else "") + "."
    if last is not None and last.get(which):
        quiet = (by.get("noise-free-last") or {}).get(which)
        sentence += (f" The last round, {last['round']}, scores {100 * last[which]['accuracy']:.1f} % there"
                     + (f" (without privacy after round {last['round']}: {100 * quiet['accuracy']:.1f} %)" if quiet else "")
                     + ".")
    return sentence + _public_clause(fed, by.get("start")) if which == "indomain" else sentence


def _public_clause(fed: Mapping[str, Any], start: Mapping[str, Any] | None) -> str:
    """What fine-tuning on the schools did to the public photos, against the start: fine-tuning can cost
    them, and the headline about the schools' faces alone would hide it. 'Level' when the 95 % CIs overlap."""
    now, before = fed.get("public"), (start or {}).get("public")
    if not now or not before:
        return ""
    pair = f"({100 * now['accuracy']:.1f} % against {100 * before['accuracy']:.1f} %)"
    low, high = now.get("accuracy_ci_low"), now.get("accuracy_ci_high")
    start_low, start_high = before.get("accuracy_ci_low"), before.get("accuracy_ci_high")
    if all(_number(v) for v in (low, high, start_low, start_high)):
        if high < start_low:
            return f" On the public photos it is {100 * (before['accuracy'] - now['accuracy']):.1f} points below the starting model {pair}."
        if low > start_high:
            return f" On the public photos it is {100 * (now['accuracy'] - before['accuracy']):.1f} points above the starting model {pair}."
        # say on what grounds: a bare "level" beside 88.3 against 90.4 read as a misprint
        return f" On the public photos it is level with the starting model within the 95 % CIs {pair}."
    return f" On the public photos it is level with the starting model {pair}."
