"""python -m train: fine-tune (or train from scratch) a Stable Diffusion model with sdjax.

    python -m train --model PATH --data DIR --output DIR [--config configs/NAME.py[:tiny]]
        [--mode full|lora|dreambooth|textual_inversion|vae|controlnet] [--steps N] [--batch-size B]
        [--learning-rate LR] [--resolution R] [--mesh data=2,fsdp=4] [--checkpoint-every K] [--seed S]
        [--any-config-key VALUE ...]

Every field of train.config.TrainConfig and of its groups is an option by its flat name (underscores or
dashes), listed below by group. Running the same command again resumes from the latest checkpoint in
OUTPUT. An OUTPUT holding a finished run, another run's files or a checkpoint of other settings is refused
(--overwrite true deletes them and starts over). An update whose loss or gradients are not finite is never
applied; --nan-policy stop (default) ends the run there, skip goes on. Errors print one line on stderr and
exit with 2.
"""

from __future__ import annotations

import logging
import sys

from sdjax.errors import one_line
from train.config import FIELDS, GROUPS, TrainConfig, from_args, load_config_file


def _usage() -> str:
    sections = {None: ["the run"]}
    sections.update({name: [f"{name}: {cls.__doc__.splitlines()[0]}"] for name, cls in GROUPS.items()})
    for name, option in FIELDS.items():
        choices = f"; {'|'.join(option.choices)}" if option.choices else ""
        sections[option.group].append(f"  --{name.replace('_', '-')} (default {option.default!r}{choices})")
    options = "\n\n".join("\n".join(lines) for lines in sections.values())
    return f"{__doc__}\nOptions:\n  --config FILE[:VARIANT]\n\n{options}\n"


def parse(argv: list[str]) -> TrainConfig:
    """argv -> TrainConfig: the --config file's config (or the defaults) with every --key value on top."""
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        raise SystemExit(0)
    pairs, config_spec = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options are --key value (see --help)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_spec = value
        else:
            pairs.append((name, value))
    config = load_config_file(config_spec) if config_spec else TrainConfig()
    return from_args(config, pairs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("train")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        config = parse(argv)
    except (ValueError, OSError, TypeError) as err:
        print(f"python -m train: error: {one_line(err)}", file=sys.stderr)
        return 2
    from sdjax import sharding
    from sdjax.process import tune_garbage_collector

    tune_garbage_collector()
    try:
        hosts = config.parallel
        sharding.initialize_distributed(hosts.coordinator, hosts.num_processes, hosts.process_id)
        from train.loop import run

        final = run(config)
    except (ValueError, OSError) as err:  # bad input, a refused output folder, a stopped run, disk errors
        print(f"python -m train: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m train: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    print(f"done: {final}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
