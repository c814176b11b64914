"""Shared command-line plumbing: user errors, `key=value` config overrides, the run folder."""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import operator
import re
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dd3d.files import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_MARKER = ".dd3d-run.json"  # written by prepare_run_dir: this folder holds a dd3d run of one kind, and what it owns
TEMP_FILES = ".*.tmp*"  # atomic_write's temporary files (left behind by a killed run)
OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*=")


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


def run(main, argv=None) -> None:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file merged over the defaults")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=500 seed=3 train.lr=5e-4"
    )


def parse_arguments(parser: argparse.ArgumentParser, argv, default_name: str) -> argparse.Namespace:
    """`parser.parse_intermixed_args(argv)`, with `key=value` overrides of configs/<default_name>'s keys taken from
    anywhere on the command line, also right after a list option (`--dist a.safetensors optim.lr=0.003`). A token
    that is the value of a one-value option (`--prompt "E=mc2"`) stays that option's value."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    keys = set(OmegaConf.load(CONFIG_DIR / default_name).keys())
    takes_one = {flag for action in parser._actions if action.nargs is None for flag in action.option_strings}
    overrides, rest = [], []
    for index, token in enumerate(argv):
        match = OVERRIDE.match(token)
        if match and match.group(1) in keys and not (index and argv[index - 1] in takes_one):
            overrides.append(token)
        else:
            rest.append(token)
    args = parser.parse_intermixed_args(rest)
    args.overrides = overrides + list(args.overrides)
    return args


def load_config(
    default_name: str,
    config_path: Path | None,
    overrides: list[str],
    base: Path | None = None,
    nullable: dict | None = None,
    **flags,
) -> DictConfig:
    """Defaults from configs/<default_name>, then `base` (a resumed run's saved config), then --config, then
    key=value overrides, then explicit flags (None = not given). Every value is then checked against its default's
    type (see check_types; `nullable` gives examples for keys whose default is null)."""
    cfg = OmegaConf.load(CONFIG_DIR / default_name)
    defaults = OmegaConf.to_container(cfg)
    OmegaConf.set_struct(cfg, True)
    try:
        if base is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(base))
        if config_path is not None:
            if not config_path.is_file():
                raise UserError(f"config file {config_path} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(config_path))
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise UserError(f"override '{bad[0]}' is not of the form key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        given = {key: value for key, value in flags.items() if value is not None}
        cfg = OmegaConf.merge(cfg, OmegaConf.create(given))
        checked = OmegaConf.create(check_types(OmegaConf.to_container(cfg, resolve=True), defaults, nullable or {}))
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from None
    OmegaConf.set_struct(checked, True)
    return checked


TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


def check_types(value, example, nullable: dict, key: str = ""):
    """`value` (plain containers) checked against the type of `example` (its default; for a null default, the
    example nullable[key]): ints accept whole floats (1e3), floats accept ints, text accepts numbers (and YAML's bare
    yes/no), a single value where a list is expected becomes a one-element list (`std_scale=2` -> [2.0]). Returns
    the converted value; a mismatch is a UserError naming the key."""
    if example is None:
        example = nullable.get(key)
    if value is None or example is None:
        return value
    if isinstance(example, dict):
        if not isinstance(value, dict):
            raise UserError(f"{key} is a group of settings ({', '.join(map(str, example))}), not {value!r}")
        return {k: check_types(v, example.get(k), nullable, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(example, list):
        items = value if isinstance(value, list) else [value]
        return [check_types(item, example[0], nullable, key) for item in items] if len(example) else items
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind = type(example)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number and math.isfinite(value):
        return float(value)
    if kind is str and isinstance(value, (str, bool)):  # a bare no/yes reads as false/true (mixed_precision: no)
        return value
    if kind is str and number:
        return str(value)
    raise UserError(f"{key} must be {TYPE_NAMES.get(kind, kind.__name__)}, not {value!r}")


COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "in": lambda a, b: a in b}


def check_ranges(cfg: DictConfig, rules: dict[str, tuple]) -> None:
    """Refuse values outside their range. rules: dotted key -> (comparison, bound, ...), all of which must hold, e.g.
    {"steps": (">=", 1), "crop_scale": (">", 0, "<=", 1), "mix": ("in", ("blend", "mixture"))}; null values pass,
    lists are checked item by item."""
    for key, rule in rules.items():
        value = OmegaConf.select(cfg, key)
        conditions = list(zip(rule[::2], rule[1::2]))
        for item in value if isinstance(value, ListConfig) else [value]:
            if item is not None and not all(COMPARISONS[op](item, bound) for op, bound in conditions):
                wanted = " and ".join(f"{op} {bound}" for op, bound in conditions)
                raise UserError(f"{key} must be {wanted}, not {value!r}")


def check_unchanged_on_resume(saved: Path, cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Refuse to resume when a setting that fixes the checkpoint's tensor shapes (a key, or every key of a group)
    differs from the saved run's config.yaml."""
    before = OmegaConf.load(saved)
    for key in keys:
        old, new = (_leaves(OmegaConf.select(c, key), key) for c in (before, cfg))
        changed = [name for name in old if name in new and old[name] != new[name]]  # (old runs may lack new keys)
        if changed:
            name = changed[0]
            raise UserError(
                f"{name} is {new[name]} but the run in {saved.parent} was made with {old[name]}, and a resumed "
                "run cannot change it; drop that setting or start a new run (another --out, or overwrite=true)"
            )


def _leaves(value, key: str) -> dict:
    """{dotted key: value} of every setting in `value` (a group of settings or a single one; null: none)."""
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return {name: leaf for k, v in value.items() for name, leaf in _leaves(v, f"{key}.{k}").items()}
    return {key: OmegaConf.to_container(value) if isinstance(value, ListConfig) else value}


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, kind: str, owns: tuple[str, ...]) -> None:
    """Make `out` the folder of a `kind` run (train_distribution, gen3d, ...) and mark it with RUN_MARKER, which
    records the kind and the names (glob patterns) of the entries such a run writes.

    A folder holding a run is refused unless resuming or overwriting, and so is resuming or overwriting a run of
    another kind. Overwrite deletes only the run's own entries and keeps the outputs of other dd3d commands saved
    inside it (sample2d's `2d/`, recognised by its manifest.json). It refuses, deleting nothing, when the folder
    holds anything else (a user's file) or is not recognisably a dd3d run: no marker, and no config.yaml written by
    an earlier dd3d for a `kind` run (see dd3d_config_kind)."""
    out = Path(out)
    marker = out / RUN_MARKER
    holds_run = marker.exists() or (out / "config.yaml").exists() or (out / "checkpoints").exists()
    if holds_run and not (resume or overwrite):
        raise UserError(f"{out} already holds a run; pass resume=true to continue it or overwrite=true to replace it")
    record = read_run_marker(marker)
    if record is not None and record["kind"] != kind:
        raise UserError(f"{out} holds a {record['kind']} run, not a {kind} run; choose another --out")
    if holds_run and overwrite and not resume:
        if record is None and dd3d_config_kind(out / "config.yaml") == kind:  # a run of a dd3d without markers
            record = {"kind": kind, "owns": [*owns, TEMP_FILES]}
        if record is None:
            raise UserError(
                f"{out} holds a config.yaml or checkpoints/ that dd3d cannot tell as its own (no {RUN_MARKER}), so "
                "overwrite=true deletes nothing; delete the folder yourself or choose another --out"
            )
        entries = [entry for entry in sorted(out.iterdir()) if entry.name != RUN_MARKER]
        owned = [e for e in entries if any(fnmatch.fnmatchcase(e.name, pattern) for pattern in record["owns"])]
        kept = [e for e in entries if e not in owned and e.is_dir() and (e / "manifest.json").is_file()]
        foreign = [e.name for e in entries if e not in owned and e not in kept]
        if foreign:
            raise UserError(
                f"{out} also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which the {kind} run "
                "did not write, so overwrite=true deletes nothing; move it away or choose another --out"
            )
        for entry in owned:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for entry in kept:
            warn(f"overwrite=true keeps {entry} (made by sample2d from the replaced run)")
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "owns": [*owns, TEMP_FILES]}
    atomic_write(marker, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_run_marker(marker: Path) -> dict | None:
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
        return {"kind": str(record["kind"]), "owns": [str(pattern) for pattern in record["owns"]]}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{marker} is unreadable; delete the run folder yourself or choose another --out") from None


def dd3d_config_kind(path: Path) -> str | None:
    """The kind of run whose config.yaml (as dd3d saves it: resume and overwrite among its keys, and every key one
    of configs/<kind>.yaml's) is at `path`, else None."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # missing, unreadable or not YAML: not a config dd3d wrote
        return None
    keys = set(saved) if isinstance(saved, dict) else set()
    for defaults in sorted(CONFIG_DIR.glob("*.yaml")):
        if {"resume", "overwrite"} <= keys <= set(OmegaConf.load(defaults)):
            return defaults.stem
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
