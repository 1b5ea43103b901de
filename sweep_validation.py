"""Check a W&B sweep config before anything is registered or run: W&B's own schema (from the
`sweeps` package), then, for `program: train.py`, that every parameter is a train.py setting
with values it accepts and that metric.name is a key train.py logs. simple_sweep.py calls it.

    python -c "import sweep_validation as v; print(v.check_sweep_config(v.load_sweep_config('sweep_config.yaml')))"
"""

import difflib
import math
import re
import warnings
from pathlib import Path

import jsonschema
import yaml

with warnings.catch_warnings():
    # sweeps 0.3 declares pydantic-1 config keys, which pydantic 2 warns about on import
    warnings.simplefilter("ignore")
    import sweeps
    from sweeps.config.schema import dereferenced_sweep_config_jsonschema as SCHEMA
    from sweeps.config.schema import validator as SCHEMA_VALIDATOR

TRAIN_PROGRAM = "train.py"
TOP_KEYS = sorted(SCHEMA["properties"])
METRIC_KEYS = sorted(SCHEMA["definitions"]["metric"]["properties"])
HYPERBAND_KEYS = sorted(SCHEMA["definitions"]["hyperband_stopping"]["properties"])
# Distributions whose samples are whole numbers; every other numeric distribution samples floats,
# which train.py's integer settings reject (`--top_k=57.0`).
DISCRETE_DISTRIBUTIONS = {"constant", "categorical", "categorical_w_probabilities", "int_uniform"}
# `command:` macros that the W&B agent replaces with a list of tokens (wandb 0.31's agent and
# create_sweep_command_args); ${envvar:NAME} may also sit inside a longer token.
WHOLE_TOKEN_MACROS = {"env", "interpreter", "program", "args", "args_no_equals", "args_no_hyphens",
                      "args_no_boolean_flags", "args_json", "args_json_file", "args_append_hydra",
                      "args_override_hydra"}


class SweepConfigError(ValueError):
    """A sweep config that cannot be read or is invalid; each line of the message names the file and the fix."""


def _branches(schema):
    """Return a schema definition and its anyOf/oneOf alternatives; the parameter schemas nest one level."""
    return [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]


PARAM_SCHEMAS = [d for name, d in SCHEMA["definitions"].items() if name.startswith("param_")]
PARAM_KEYS = sorted({key for d in PARAM_SCHEMAS for b in _branches(d) for key in b.get("properties", {})})
DISTRIBUTIONS = sorted({name for d in PARAM_SCHEMAS for b in _branches(d)
                        for name in b.get("properties", {}).get("distribution", {}).get("enum", [])})


def load_sweep_config(path):
    """Read a sweep config YAML file into a dict; raise SweepConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SweepConfigError(f"sweep config {path} not found; pass an existing file with --config FILE") from None
    except OSError as e:
        raise SweepConfigError(f"sweep config {path} cannot be read ({e.strerror}); check its permissions") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepConfigError(f"sweep config {path} is not valid YAML{where} "
                               f"({getattr(e, 'problem', None) or e}); fix the file") from None
    if not isinstance(config, dict):
        raise SweepConfigError(f"sweep config {path} must be a YAML mapping with program, method, metric "
                               f"and parameters, not a {type(config).__name__}")
    return config


def _unknown_keys(mapping, allowed, where):
    problems = []
    for key in mapping:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the keys allowed here are {', '.join(allowed)}"
        problems.append(f"{where}{key}: unknown key; {hint}")
    return problems


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parameter_distribution(spec):
    """Return the distribution W&B infers for a parameter spec (as the sweeps package does)."""
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    return None


def check_parameter(name, spec):
    """Return the problems of one parameter spec that the schema reports poorly or not at all."""
    where = f"parameters.{name}"
    if not isinstance(spec, dict):
        return [f"{where}: expected a mapping such as {{values: [a, b]}} or {{value: x}}, got {spec!r}"]
    problems = _unknown_keys(spec, PARAM_KEYS, f"{where}.")
    distribution = spec.get("distribution")
    if distribution is not None and distribution not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(distribution), DISTRIBUTIONS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(DISTRIBUTIONS)}"
        problems.append(f"{where}.distribution: unknown distribution {distribution!r}; {hint}")
    for bound in ("min", "max"):
        value = spec.get(bound)
        if bound in spec and not _is_number(value):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
                # YAML 1.1 floats need a dot in the mantissa and a sign in the exponent
                mantissa, exponent = f"{float(value):e}".split("e")
                mantissa = f"{float(mantissa):.15g}"
                mantissa += "" if "." in mantissa else ".0"
                hint = f"; YAML reads {value} as text, write it as {mantissa}e{exponent}"
            problems.append(f"{where}.{bound}: {value!r} is not a number{hint}")
    low, high = spec.get("min"), spec.get("max")
    if _is_number(low) and _is_number(high):
        if low >= high:
            problems.append(f"{where}: min {low} is not below max {high}; swap them or widen the range")
        elif distribution == "log_uniform":
            problems.append(f"{where}: log_uniform takes natural-log exponents, so min {low} and max {high} "
                            f"sample values from {math.exp(low):.6g} to {math.exp(high):.6g}; to give the "
                            f"values themselves use distribution: log_uniform_values")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        problems.append(f"{where}.values: expected a non-empty list, got {spec['values']!r}")
    return problems


def check_train_parameter(name, spec):
    """Return the problems of a parameter that train.py would reject."""
    import train
    where = f"parameters.{name}"
    kinds = {setting: kind for setting, _, kind, _ in train.SETTINGS}
    if name not in kinds:
        close = difflib.get_close_matches(str(name), list(kinds), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "`python train.py --help` lists them"
        return [f"{where}: train.py has no setting {name!r}; {hint}"]
    kind, choices = kinds[name], train.CHOICES.get(name)

    if "parameters" in spec:
        return [f"{where}: train.py takes flat --name=value settings, so nested parameters cannot be passed"]
    distribution = parameter_distribution(spec)
    if kind is int and distribution not in DISCRETE_DISTRIBUTIONS:
        return [f"{where}: train.py --{name} takes an integer but {distribution} samples floats; "
                f"use distribution: int_uniform or a list of values"]
    if kind in (str, bool) and distribution not in DISCRETE_DISTRIBUTIONS:
        return [f"{where}: train.py --{name} takes a {kind.__name__}; list the options with values: [...]"]

    candidates = [spec["value"]] if "value" in spec else list(spec.get("values") or [])
    candidates += [spec[k] for k in ("min", "max") if _is_number(spec.get(k))]
    parse = train.parse_bool if kind is bool else train.optional(kind)

    problems = []
    for value in candidates:
        # the agent passes str(value), so parse exactly that text the way train.py does
        try:
            parsed = parse(str(value))
        except (ValueError, TypeError, train.argparse.ArgumentTypeError):
            problems.append(f"{where}: train.py --{name} takes a {kind.__name__}, so {value!r} is rejected")
            continue
        if choices and parsed not in choices:
            problems.append(f"{where}: {value!r} is not one of train.py's --{name} choices {', '.join(choices)}")
            continue
        try:  # the range checks train.py applies before training, on this value alone
            train.validate_config({**train.DEFAULTS, name: parsed})
        except ValueError as e:
            if str(e).startswith(f"--{name}="):
                problems.append(f"{where}: train.py would reject {value!r}: {e}")
    return problems


def _fixed_value(config, name, default):
    spec = (config.get("parameters") or {}).get(name)
    return spec["value"] if isinstance(spec, dict) and "value" in spec else default


def check_metric(config, is_train):
    """Return the problems of the metric section: present where needed, logged by train.py."""
    metric = config.get("metric")
    method = config.get("method")
    if metric is None:
        if method == "bayes" or "early_terminate" in config:
            return ["metric: missing; bayes search and hyperband need one, such as "
                    "metric: {name: val/loss, goal: minimize}"]
        return []
    if not isinstance(metric, dict):
        return [f"metric: expected a mapping such as {{name: val/loss, goal: minimize}}, got {metric!r}"]
    problems = _unknown_keys(metric, METRIC_KEYS, "metric.")
    name, goal = metric.get("name"), metric.get("goal", "minimize")
    if not is_train or not isinstance(name, str):
        return problems
    import train
    if name not in train.LOGGED_METRICS:
        close = difflib.get_close_matches(name, train.LOGGED_METRICS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(train.LOGGED_METRICS)}"
        return problems + [f"metric.name: train.py never logs {name!r}, so no run would have a result; {hint}"]
    if name == "val/meteor" and _fixed_value(config, "meteor", train.DEFAULTS["meteor"]) is False:
        return problems + ["metric.name: val/meteor is never logged, because parameters set meteor: false; "
                           "rank by val/cider, or set meteor: {value: true} (train.py then needs java)"]
    # train.py keeps each run's best validation point by its own --metric; the sweep must rank by the same
    kept = _fixed_value(config, "metric", train.DEFAULTS["metric"])
    kept_goal = _fixed_value(config, "metric_goal", train.DEFAULTS["metric_goal"])
    if kept_goal == "auto":
        from checkpoints import metric_goal
        kept_goal = metric_goal(kept)
    if name.startswith("val/") and (kept, kept_goal) != (name, goal):
        problems.append(f"metric: the sweep ranks runs by {name} ({goal}) but train.py keeps each run's "
                        f"checkpoint by --metric={kept} ({kept_goal}); add `metric: {{value: {name}}}` and "
                        f"`metric_goal: {{value: {goal}}}` under parameters")
    return problems


def check_command(config):
    command = config.get("command")
    if command is None:
        return []
    if not isinstance(command, list):
        return [f"command: expected a list of tokens such as [${{env}}, ${{interpreter}}, ${{program}}, "
                f"${{args}}], got {command!r}"]
    problems = []
    for token in map(str, command):
        for macro in re.findall(r"\$\{([^}]*)\}", token):
            if macro.startswith("envvar:"):
                continue
            if macro not in WHOLE_TOKEN_MACROS:
                problems.append(f"command: unknown macro ${{{macro}}}; use one of "
                                f"{', '.join('${' + m + '}' for m in sorted(WHOLE_TOKEN_MACROS))} or ${{envvar:NAME}}")
            elif token != f"${{{macro}}}":
                problems.append(f"command: ${{{macro}}} must be a list item of its own, not part of {token!r}")
    return problems


def check_program(config, cwd):
    program = config.get("program")
    if not isinstance(program, str) or not program:
        return ["program: missing; set program: train.py (the script each trial runs)"]
    if not (Path(cwd) / program).is_file():
        return [f"program: {program} not found in {Path(cwd).resolve()}; run from the folder that contains it "
                f"or give its absolute path"]
    return []


def schema_problems(config, flagged):
    """Return W&B schema violations, each with its key path; skip parameters already reported."""
    problems = []
    own_key_checks = {(), ("metric",), ("early_terminate",)}
    for error in SCHEMA_VALIDATOR.iter_errors(config):
        # an anyOf error (a parameter spec) reports only "not valid under any of the given schemas",
        # so report the alternative that matched furthest, which names the real problem
        detail = jsonschema.exceptions.best_match(error.context) if error.context else error
        path = tuple(detail.absolute_path) or tuple(error.absolute_path)
        if detail.validator == "additionalProperties" and path in own_key_checks:
            continue  # already reported with a suggestion by _unknown_keys
        if path[:1] == ("parameters",) and len(path) > 1 and path[1] in flagged:
            continue
        problems.append(f"{'.'.join(map(str, path)) or 'top level'}: {detail.message}")
    # checks of the sweeps package that are not part of the JSON schema (min/max, probabilities, deprecations)
    schema_messages = {e.message for e in SCHEMA_VALIDATOR.iter_errors(config)}
    for message in sweeps.schema_violations_from_proposed_config(config):
        mentions_flagged = any(re.search(rf"\b{re.escape(str(name))}\b", message) for name in flagged)
        if message not in schema_messages and not mentions_flagged and message not in problems:
            problems.append(message)
    return problems


def check_sweep_config(config, cwd="."):
    """Return every problem of a sweep config as a one-line message naming the key; [] when valid."""
    problems = _unknown_keys(config, TOP_KEYS, "")
    flagged = set()  # parameters already reported, whose schema errors would only repeat the problem
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        problems.append("parameters: missing or empty; list the settings to search, such as "
                        "learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 5.0e-5}")
        parameters = {}
        flagged.add("parameters")
    is_train = Path(str(config.get("program", ""))).name == TRAIN_PROGRAM
    for name, spec in parameters.items():
        found = check_parameter(name, spec)
        if not found and is_train:
            found = check_train_parameter(name, spec)
        if found:
            flagged.add(name)
            problems += found
    if isinstance(config.get("early_terminate"), dict):
        problems += _unknown_keys(config["early_terminate"], HYPERBAND_KEYS, "early_terminate.")
    problems += check_metric(config, is_train)
    problems += check_program(config, cwd)
    problems += check_command(config)
    if all(isinstance(spec, dict) for spec in parameters.values()):
        problems += schema_problems(config, flagged)
    if problems:
        return problems

    # last, let the engine itself plan a run: it rejects what only it checks (grid over a continuous range)
    try:
        sweeps.next_runs(config, [], validate=True, n=1)
        if "early_terminate" in config:
            sweeps.stop_runs(config, [], validate=True)
    except (ValueError, jsonschema.ValidationError) as e:
        problems.append(f"W&B's sweep engine rejects the config: {str(e).splitlines()[0]}")
    return problems
