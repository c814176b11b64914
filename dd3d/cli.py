"""Shared command-line plumbing: user errors, `key=value` config overrides, the run folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def load_config(
    default_name: str, config_path: Path | None, overrides: list[str], base: Path | None = None, **flags
) -> DictConfig:
    """Defaults from configs/<default_name>, then `base` (a resumed run's saved config), then --config, then
    key=value overrides, then explicit flags (None = not given)."""
    cfg = OmegaConf.load(CONFIG_DIR / default_name)
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
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from None
    return cfg


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless resuming or overwriting."""
    holds_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
    if holds_run and not (resume or overwrite):
        raise UserError(f"{out} already holds a run; pass resume=true to continue it or overwrite=true to replace it")
    if holds_run and overwrite and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
