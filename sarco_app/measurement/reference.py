"""Reference tables for T-scores and published cut-offs, read from data files.

Two kinds of data live in ``sarco_app/measurement/references/`` (never as literals in code):

* **T-score tables** (CSV): young-adult mean and SD of each muscle index per sex. Lines that
  start with ``#`` carry the provenance (``# name: ...``, ``# source: ...``, ``# doi: ...``);
  the columns are ``sex,index,n,mean,sd,t_minus1,t_minus2`` where ``t_minus1`` / ``t_minus2``
  are the index values at T = -1 and T = -2. The default is the paper's Table 4
  (``lee2022_young_adults.csv``). :func:`derive_reference` writes a table in the same form
  from a cohort export, and any such file can be passed with ``--reference PATH``.
* **Cut-offs** (``cutoffs.json``): rules of the form "flag when INDEX < THRESHOLD for this sex
  and BMI range", with citation and DOI per publication (Prado 2008, Martin 2013).

T-score: ``T = (value - reference mean) / reference SD``; categories ``normal`` (T > -1),
``low`` (-2 < T <= -1) and ``sarcopenia`` (T <= -2).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sarco_app.errors import SarcoError

REFERENCE_DIR = Path(__file__).resolve().parent / "references"
DEFAULT_TABLE = REFERENCE_DIR / "lee2022_young_adults.csv"
DEFAULT_CUTOFFS = REFERENCE_DIR / "cutoffs.json"

#: The muscle indices a T-score table may hold (keys of ``quantify``'s ``indices``).
TABLE_INDICES = ("sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi", "muscle_hu_mean")
#: Spellings accepted in user tables for the index column.
_INDEX_ALIASES = {
    "sma": "sma_cm2",
    "sma_cm2": "sma_cm2",
    "sma/ht2": "smi_cm2_m2",
    "sma/ht²": "smi_cm2_m2",
    "smi": "smi_cm2_m2",
    "smi_cm2_m2": "smi_cm2_m2",
    "sma/wt": "sma_per_weight",
    "sma_per_weight": "sma_per_weight",
    "sma/bmi": "sma_per_bmi",
    "sma_per_bmi": "sma_per_bmi",
    "muscle_hu_mean": "muscle_hu_mean",
    "smra": "muscle_hu_mean",
}
TABLE_COLUMNS = ("sex", "index", "n", "mean", "sd", "t_minus1", "t_minus2")
CATEGORIES = ("normal", "low", "sarcopenia")


@dataclass(frozen=True)
class ReferenceStat:
    """Mean and SD of one index for one sex in a reference group."""

    n: int | None
    mean: float
    sd: float

    @property
    def t_minus1(self) -> float:
        return self.mean - self.sd

    @property
    def t_minus2(self) -> float:
        return self.mean - 2.0 * self.sd


@dataclass
class ReferenceTable:
    """A young-adult T-score table: ``stats[(sex, index)]`` with provenance lines."""

    name: str
    stats: dict[tuple[str, str], ReferenceStat]
    provenance: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def indices(self) -> list[str]:
        """Indices present for at least one sex, in the canonical order."""
        present = {index for _, index in self.stats}
        return [i for i in TABLE_INDICES if i in present]

    def stat(self, sex: str | None, index: str) -> ReferenceStat | None:
        if sex is None:
            return None
        return self.stats.get((sex, index))

    def t_score(self, sex: str | None, index: str, value: float | None) -> float | None:
        """T-score of ``value`` against this table (None when sex, value or row is missing)."""
        row = self.stat(sex, index)
        if row is None or value is None or not math.isfinite(value):
            return None
        return t_score(value, row.mean, row.sd)

    def describe(self) -> str:
        """One line naming the table and its source (used in outputs)."""
        source = self.provenance.get("source")
        doi = self.provenance.get("doi")
        text = self.name
        if source and source != self.name:
            text += f" — {source}"
        if doi and doi.lower().startswith("10."):
            text += f" (doi:{doi})"
        return text

    def rows(self) -> list[dict[str, Any]]:
        """The table as rows with the T = -1 and T = -2 cut-offs, sorted by sex then index."""
        order = {name: i for i, name in enumerate(TABLE_INDICES)}
        out = []
        for (sex, index), s in sorted(self.stats.items(), key=lambda kv: (kv[0][0] != "M", order[kv[0][1]])):
            out.append(
                {
                    "sex": sex,
                    "index": index,
                    "n": s.n,
                    "mean": s.mean,
                    "sd": s.sd,
                    "t_minus1": s.t_minus1,
                    "t_minus2": s.t_minus2,
                }
            )
        return out


def t_score(value: float, mean: float, sd: float) -> float:
    """``(value - mean) / sd`` (dimensionless)."""
    return (float(value) - float(mean)) / float(sd)


def category(t: float | None) -> str | None:
    """'normal' (T > -1), 'low' (-2 < T <= -1) or 'sarcopenia' (T <= -2); None for None.

    A tiny tolerance keeps values that equal a published cut-off (e.g. SMA 153.56 cm² for men,
    T = -1 up to rounding) on the side the definition puts them.
    """
    if t is None or not math.isfinite(t):
        return None
    eps = 1e-9
    if t <= -2.0 + eps:
        return "sarcopenia"
    if t <= -1.0 + eps:
        return "low"
    return "normal"


def _normalise_index(name: str, where: str) -> str:
    key = str(name).strip().lower().replace(" ", "")
    if key not in _INDEX_ALIASES:
        raise SarcoError(f"{where}: unknown index {name!r}; use one of {', '.join(TABLE_INDICES)}")
    return _INDEX_ALIASES[key]


def _normalise_sex(value: str, where: str) -> str:
    from sarco_app.inputs.patient import normalise_sex

    sex = normalise_sex(value)
    if sex is None:
        raise SarcoError(f"{where}: sex must be M or F, got {value!r}")
    return sex


def load_reference(path: str | Path | None = None) -> ReferenceTable:
    """Read a T-score table (CSV with ``#`` provenance lines); the paper's Table 4 by default.

    Raises :class:`SarcoError` for a missing file, missing columns, non-numeric values or an
    SD that is not positive.
    """
    path = Path(path) if path is not None else DEFAULT_TABLE
    if not path.is_file():
        raise SarcoError(f"reference table {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SarcoError(f"reference table {path}: cannot read ({exc})") from exc
    provenance: dict[str, str] = {}
    data_lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition(":")
            if sep:
                provenance[key.strip().lower()] = value.strip()
        elif stripped:
            data_lines.append(line)
    reader = csv.DictReader(io.StringIO("\n".join(data_lines)))
    columns = {c.strip().lower() for c in (reader.fieldnames or [])}
    missing = {"sex", "index", "mean", "sd"} - columns
    if missing:
        raise SarcoError(f"reference table {path.name}: missing column(s) {', '.join(sorted(missing))}")
    stats: dict[tuple[str, str], ReferenceStat] = {}
    for line_no, raw in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        where = f"reference table {path.name} row {line_no}"
        sex = _normalise_sex(row["sex"], where)
        index = _normalise_index(row["index"], where)
        try:
            mean, sd = float(row["mean"]), float(row["sd"])
            n = int(float(row["n"])) if row.get("n") else None
        except ValueError as exc:
            raise SarcoError(f"{where}: mean, sd and n must be numbers") from exc
        if not (math.isfinite(mean) and math.isfinite(sd)) or sd <= 0:
            raise SarcoError(f"{where}: sd must be a positive number")
        stats[(sex, index)] = ReferenceStat(n=n, mean=mean, sd=sd)
    if not stats:
        raise SarcoError(f"reference table {path.name}: no rows")
    name = provenance.get("name") or path.stem
    return ReferenceTable(name=name, stats=stats, provenance=provenance, path=str(path))


def find_reference(name_or_path: str | Path | None, extra_dirs: Iterable[str | Path] = ()) -> ReferenceTable:
    """Load a T-score table given by name or path.

    A bare name (``lee2022_young_adults``) is looked up as ``<name>.csv`` in ``extra_dirs``
    (e.g. a studies folder's ``references/``) and then in the bundled tables; anything else is
    read as a CSV path. ``None`` or ``""`` gives the default table.
    """
    if name_or_path is None or str(name_or_path).strip() == "":
        return load_reference()
    text = str(name_or_path).strip()
    if "/" not in text and "\\" not in text and not text.lower().endswith(".csv"):
        for folder in [*map(Path, extra_dirs), REFERENCE_DIR]:
            candidate = folder / f"{text}.csv"
            if candidate.is_file():
                return load_reference(candidate)
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.csv"))
        raise SarcoError(f"unknown reference table {text!r}; bundled tables: {', '.join(known)}")
    return load_reference(text)


# --------------------------------------------------------------------------- cut-offs


@dataclass(frozen=True)
class CutoffRule:
    """Flag ``flag`` when ``index < below`` for ``sex`` (None = any) and BMI in [bmi_min, bmi_max)."""

    source: str
    flag: str
    index: str
    below: float
    sex: str | None = None
    bmi_min: float | None = None
    bmi_max: float | None = None

    @property
    def key(self) -> str:
        return f"{self.source}_{self.flag}"

    @property
    def needs_bmi(self) -> bool:
        return self.bmi_min is not None or self.bmi_max is not None

    def applies(self, sex: str | None, bmi: float | None) -> bool:
        if self.sex is not None and sex != self.sex:
            return False
        if self.bmi_min is not None and not (bmi is not None and bmi >= self.bmi_min):
            return False
        if self.bmi_max is not None and not (bmi is not None and bmi < self.bmi_max):
            return False
        return True

    def describe(self) -> str:
        """E.g. ``smi_cm2_m2 < 43 (sex M, BMI < 25)``."""
        parts = []
        if self.sex:
            parts.append(f"sex {self.sex}")
        if self.bmi_min is not None:
            parts.append(f"BMI >= {self.bmi_min:g}")
        if self.bmi_max is not None:
            parts.append(f"BMI < {self.bmi_max:g}")
        scope = f" ({', '.join(parts)})" if parts else ""
        return f"{self.index} < {self.below:g}{scope}"


@dataclass
class Cutoffs:
    """Published cut-off rules with their citations."""

    rules: list[CutoffRule]
    citations: dict[str, str]
    path: str | None = None

    @property
    def flag_keys(self) -> list[str]:
        keys: list[str] = []
        for rule in self.rules:
            if rule.key not in keys:
                keys.append(rule.key)
        return keys


def load_cutoffs(path: str | Path | None = None) -> Cutoffs:
    """Read cut-off rules (``cutoffs.json`` by default); see that file for the format."""
    path = Path(path) if path is not None else DEFAULT_CUTOFFS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SarcoError(f"cut-off file {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise SarcoError(f"cut-off file {path.name}: not readable JSON ({exc})") from exc
    rules: list[CutoffRule] = []
    citations: dict[str, str] = {}
    for source, entry in data.items():
        if source.startswith("_"):
            continue
        try:
            citation = entry["citation"]
            if entry.get("doi"):
                citation += f" doi:{entry['doi']}"
            citations[source] = citation
            for rule in entry["rules"]:
                rules.append(
                    CutoffRule(
                        source=source,
                        flag=str(rule["flag"]),
                        index=_normalise_index(rule["index"], f"cut-off file {path.name}"),
                        below=float(rule["below"]),
                        sex=_normalise_sex(rule["sex"], f"cut-off file {path.name}") if rule.get("sex") else None,
                        bmi_min=float(rule["bmi_min"]) if rule.get("bmi_min") is not None else None,
                        bmi_max=float(rule["bmi_max"]) if rule.get("bmi_max") is not None else None,
                    )
                )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SarcoError):
                raise
            raise SarcoError(f"cut-off file {path.name}: malformed entry {source!r} ({exc})") from exc
    return Cutoffs(rules=rules, citations=citations, path=str(path))


def evaluate_flags(
    cutoffs: Cutoffs, sex: str | None, bmi: float | None, indices: dict[str, float | None]
) -> tuple[dict[str, bool | None], dict[str, str], dict[str, str]]:
    """Apply every cut-off rule to one scan.

    Returns ``(flags, criteria, reasons)``: ``flags[key]`` is True (below the cut-off), False,
    or None when sex, BMI or the index is unknown; ``criteria[key]`` is the rule applied;
    ``reasons[key]`` says why a flag is None.
    """
    flags: dict[str, bool | None] = {}
    criteria: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for key in cutoffs.flag_keys:
        rules = [r for r in cutoffs.rules if r.key == key]
        missing = []
        if any(r.sex is not None for r in rules) and sex is None:
            missing.append("sex")
        if any(r.needs_bmi for r in rules) and bmi is None:
            missing.append("BMI")
        if missing:
            flags[key] = None
            reasons[key] = f"{' and '.join(missing)} unknown"
            continue
        matching = [r for r in rules if r.applies(sex, bmi)]
        if not matching:
            flags[key] = None
            reasons[key] = f"no {key} cut-off for sex {sex}" + (f", BMI {bmi:.1f}" if bmi else "")
            continue
        rule = matching[0]
        value = indices.get(rule.index)
        criteria[key] = rule.describe()
        if value is None:
            flags[key] = None
            reasons[key] = f"{rule.index} unknown"
            continue
        flags[key] = bool(value < rule.below)
    return flags, criteria, reasons


# --------------------------------------------------------------------------- deriving a table


def derive_reference(
    cohort_csv: str | Path,
    age_max: float | None = 39.0,
    age_min: float | None = None,
    indices: Iterable[str] = ("sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi"),
    name: str | None = None,
) -> ReferenceTable:
    """A T-score table (mean, SD per sex and index) from a cohort export.

    ``cohort_csv`` is the CSV written by ``python -m sarco_app cohort`` (or any CSV with columns
    ``sex``, ``age`` and the index columns). Rows whose ``status`` is not ``ok`` are dropped;
    with ``age_max``/``age_min`` (years, inclusive) rows of unknown age are dropped too. SD is
    the sample SD (ddof = 1), so each sex needs at least two values of an index.
    """
    import pandas as pd

    cohort_csv = Path(cohort_csv)
    if not cohort_csv.is_file():
        raise SarcoError(f"cohort table {cohort_csv}: no such file")
    try:
        frame = pd.read_csv(cohort_csv)
    except Exception as exc:  # pandas raises several types for a bad CSV
        raise SarcoError(f"cohort table {cohort_csv.name}: not a readable CSV ({exc})") from exc
    wanted = [_normalise_index(i, "--indices") for i in indices]
    missing = [c for c in ["sex", *wanted] if c not in frame.columns]
    if missing:
        raise SarcoError(f"cohort table {cohort_csv.name}: missing column(s) {', '.join(missing)}")
    total = len(frame)
    if "status" in frame.columns:
        frame = frame[frame["status"].astype(str) == "ok"]
    if age_max is not None or age_min is not None:
        if "age" not in frame.columns:
            raise SarcoError(f"cohort table {cohort_csv.name}: no age column to filter on")
        age = pd.to_numeric(frame["age"], errors="coerce")
        keep = age.notna()
        if age_max is not None:
            keep &= age <= age_max
        if age_min is not None:
            keep &= age >= age_min
        frame = frame[keep]
    from sarco_app.inputs.patient import normalise_sex

    frame = frame.assign(_sex=frame["sex"].map(normalise_sex))
    stats: dict[tuple[str, str], ReferenceStat] = {}
    counts = {}
    for sex in ("M", "F"):
        group = frame[frame["_sex"] == sex]
        counts[sex] = len(group)
        for index in wanted:
            values = pd.to_numeric(group[index], errors="coerce").dropna()
            if len(values) < 2:
                continue
            sd = float(values.std(ddof=1))
            if sd <= 0:
                continue
            stats[(sex, index)] = ReferenceStat(n=int(len(values)), mean=float(values.mean()), sd=sd)
    if not stats:
        raise SarcoError(
            f"cohort table {cohort_csv.name}: fewer than two usable scans per sex after filtering "
            f"({total} rows; men {counts['M']}, women {counts['F']}) — no table derived"
        )
    ages = []
    if age_min is not None:
        ages.append(f"age >= {age_min:g}")
    if age_max is not None:
        ages.append(f"age <= {age_max:g}")
    selection = ", ".join(ages) if ages else "all ages"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    provenance = {
        "name": name or f"{cohort_csv.stem} reference ({selection})",
        "source": (
            f"derived with `python -m sarco_app reference` from {cohort_csv.name} on {stamp}: "
            f"status ok, {selection}; men n={counts['M']}, women n={counts['F']}; sample SD (ddof=1)"
        ),
        "note": "t_minus1 = mean - SD and t_minus2 = mean - 2 SD",
    }
    return ReferenceTable(name=provenance["name"], stats=stats, provenance=provenance)


def write_reference(table: ReferenceTable, path: str | Path) -> Path:
    """Write ``table`` as a CSV that :func:`load_reference` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {key}: {value}" for key, value in table.provenance.items()]
    if "name" not in table.provenance:
        lines.insert(0, f"# name: {table.name}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in table.rows():
        writer.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()}
        )
    path.write_text("\n".join(lines) + "\n" + buffer.getvalue(), encoding="utf-8")
    return path
