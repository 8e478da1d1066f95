"""The ``--stats-spec`` YAML of the group level: defaults, loading and validation.

Every key is optional; a missing key takes its default (:data:`DEFAULTS`). Unknown keys, wrong
types and values outside their choices are usage errors (exit 64) that name the key. The annotated
example is ``brainage_bids/data/stats_spec_example.yml``.
"""
from __future__ import annotations

import copy
from pathlib import Path

from .bias import METHODS

#: Default specification; the nesting is the YAML's.
DEFAULTS: dict = {
    "columns": {"diagnosis": "diagnosis", "phenotype": "phenotype", "sex": "sex", "age": "age",
                "disease_duration": "disease_duration", "edss": "edss", "site": "site"},
    "controls": ["HC"],
    "groups": {"diagnosis": None, "phenotype": None},
    "covariates": [],
    "bias": {"method": "cole", "min_controls": 10, "fit_file": None},
    "rows": {"model": "auto", "suffix": "all", "lesion_filled": "raw", "session": "baseline",
             "gap": "corrected"},
    "worsening": {"source": "auto", "time": "auto", "time_unit": "auto",
                  "followup_time": "followup_years", "followup_unit": "years",
                  "event": "edss_worsening"},
    "roc": {"specificity": 0.80},
    "psm": {"treatment": None, "covariates": ["age", "sex"], "caliper": None,
            "ratio": 1},
    "model_comparison": {"pairs": "auto"},
    "bootstrap": {"n": 2000, "seed": 0},
    "min_group_size": 2,
    "exclude_qc_flags": [],
    "skip_analyses": [],
}

#: Analyses of the group level, as named in group/stats/skipped.tsv and ``skip_analyses``.
ANALYSES = ("evaluation", "site_mae", "model_comparison", "gap_summary", "gap_longitudinal",
            "gap_by_diagnosis", "gap_by_phenotype", "sex_by_diagnosis", "edss_by_diagnosis",
            "lm_gap_diagnosis", "lm_gap_phenotype", "lm_gap_duration", "lm_edss_gap", "psm",
            "edss_worsening", "roc_worsening", "km_worsening", "cox_worsening",
            "lesion_filling_agreement", "contrast_agreement")

_STR, _INT, _FLOAT, _LIST = "a string", "an integer", "a number", "a list of strings"
#: Expected type of every leaf: a type name, optionally with allowed choices or "null ok".
_TYPES: dict = {
    "columns": {k: (_STR,) for k in DEFAULTS["columns"]},
    "controls": (_LIST,),
    "groups": {"diagnosis": (_LIST, None), "phenotype": (_LIST, None)},
    "covariates": (_LIST,),
    "bias": {"method": (_STR, METHODS), "min_controls": (_INT,), "fit_file": (_STR, None)},
    "rows": {"model": (_STR,), "suffix": (_LIST,), "lesion_filled": (_STR, ("raw", "filled")),
             "session": (_STR, ("baseline",)), "gap": (_STR, ("corrected", "raw"))},
    "worsening": {"source": (_STR, ("auto", "sessions", "participants")), "time": (_STR,),
                  "time_unit": (_STR, ("auto", "years", "days")), "followup_time": (_STR,),
                  "followup_unit": (_STR, ("years", "days")), "event": (_STR,)},
    "roc": {"specificity": (_FLOAT,)},
    "psm": {"treatment": (_LIST, None), "covariates": (_LIST,),
            "caliper": (_FLOAT, None), "ratio": (_INT,)},
    "model_comparison": {"pairs": ("pairs",)},
    "bootstrap": {"n": (_INT,), "seed": (_INT, None)},
    "min_group_size": (_INT,),
    "exclude_qc_flags": (_LIST,),
    "skip_analyses": (_LIST,),
}


def _error(message: str):
    from ..cli.parser import EXIT_USAGE, UsageError

    return UsageError(f"--stats-spec: {message}", EXIT_USAGE)


def _check_leaf(key: str, value, rule: tuple):
    kind = rule[0]
    nullable = len(rule) > 1 and rule[1] is None
    choices = rule[1] if len(rule) > 1 and rule[1] is not None else None
    if value is None:
        if nullable:
            return None
        raise _error(f"key {key!r} may not be empty (null)")
    if kind == _STR:
        if not isinstance(value, str):
            raise _error(f"key {key!r} must be {kind}, got {type(value).__name__} {value!r}")
        if choices and value not in choices:
            raise _error(f"key {key!r} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f"key {key!r} must be {kind}, got {type(value).__name__} {value!r}")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(f"key {key!r} must be {kind}, got {type(value).__name__} {value!r}")
        return float(value)
    if kind == _LIST:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single label is accepted for convenience
        if not isinstance(value, list) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise _error(f"key {key!r} must be {kind}, got {value!r}")
        return [str(v) for v in value]
    if kind == "pairs":
        if value == "auto":
            return value
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and "/" in x for x in p)
            for p in value)
        if not ok:
            raise _error(f"key {key!r} must be 'auto' or a list of [\"model/suffix\", "
                         f"\"model/suffix\"] pairs; got {value!r}")
        return [[tuple(x.split("/", 1)) for x in p] for p in value]
    raise AssertionError(kind)


def _merge(user: dict, defaults: dict, types: dict, prefix: str = "") -> dict:
    if not isinstance(user, dict):
        raise _error(f"key {prefix.rstrip('.') or '(top level)'!r} must be a mapping, got "
                     f"{type(user).__name__}")
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        full = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(sorted(types))
            of = f" of {prefix[:-1]!r}" if prefix else ""
            raise _error(f"unknown key {full!r} (known keys{of}: {known})")
        if isinstance(types[key], dict):
            out[key] = _merge(value if value is not None else {}, defaults[key], types[key],
                              f"{full}.")
        else:
            out[key] = _check_leaf(full, value, types[key])
    return out


def validate_spec(user: dict | None) -> dict:
    """The full specification: ``user`` values over :data:`DEFAULTS`, type- and range-checked.
    Raises :class:`brainage_bids.cli.parser.UsageError` (exit 64) naming the offending key."""
    spec = _merge(user or {}, DEFAULTS, _TYPES)
    if not 0 < spec["roc"]["specificity"] < 1:
        raise _error("key 'roc.specificity' must lie between 0 and 1")
    if spec["bias"]["min_controls"] < 3:
        raise _error("key 'bias.min_controls' must be at least 3")
    if spec["bootstrap"]["n"] < 10:
        raise _error("key 'bootstrap.n' must be at least 10")
    if spec["min_group_size"] < 2:
        raise _error("key 'min_group_size' must be at least 2")
    if spec["psm"]["ratio"] < 1:
        raise _error("key 'psm.ratio' must be at least 1")
    if spec["psm"]["caliper"] is not None and spec["psm"]["caliper"] <= 0:
        raise _error("key 'psm.caliper' must be positive")
    if spec["psm"]["treatment"] is not None and len(spec["psm"]["treatment"]) != 2:
        raise _error("key 'psm.treatment' must name two levels: [treated, control]")
    if not spec["controls"]:
        raise _error("key 'controls' needs at least one label")
    unknown = sorted(set(spec["skip_analyses"]) - set(ANALYSES))
    if unknown:
        raise _error(f"key 'skip_analyses' names unknown analyses {unknown}; known: "
                     f"{', '.join(ANALYSES)}")
    if spec["rows"]["suffix"] == ["all"]:
        spec["rows"]["suffix"] = "all"
    return spec


def load_spec(path: str | Path | None) -> dict:
    """Read and validate a ``--stats-spec`` YAML file (defaults when ``path`` is None)."""
    if path is None:
        return validate_spec({})
    import yaml

    from ..cli.parser import EXIT_NO_INPUT, UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--stats-spec: file not found: {path}", EXIT_NO_INPUT)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _error(f"{path} is not valid YAML: {exc}") from exc
    return validate_spec(data)
