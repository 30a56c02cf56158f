"""Entry point inside each worker: `python -m bloomrun.trainer.train --config CONFIG.yaml`.

Run under torchrun (the operator's pods, `bloomctl run`) or alone (a world of one). The
config is a TrainerConfig in the manifest's camelCase keys. Exit status: 0 when training
completed or stopped cleanly on SIGTERM after a checkpoint; 75 when a peer was stopped
(torchrun then re-forms the group without it); 2 for a bad config or data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml
from pydantic import ValidationError

from bloomrun.trainer.config import TrainerConfig, format_validation_error
from bloomrun.trainer.runlock import die_with_launcher


TERMINATION_LOG = "/dev/termination-log"
# The first words of a permanent refusal's termination message: the operator reads them
# (bloomrun.operator.reconcile), since torchrun hides the trainer's own exit code behind its 1.
PERMANENT_MARK = "permanent: "
# The first words of the termination message the hang watchdog (bloomrun.trainer.watchdog)
# writes when a rank of this pod hung: the operator classifies the failure `Hung`.
HUNG_MARK = "hung: "


def load_config(path: str) -> TrainerConfig:
    with open(path) as f:
        raw = yaml.safe_load(f)
    return TrainerConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # no orphan trainers if torchrun is SIGKILLed (runlock.py)
    parser = argparse.ArgumentParser(prog="bloomrun.trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainerConfig YAML (camelCase keys)")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
    except (OSError, yaml.YAMLError) as err:
        return refuse(f"{args.config}: {err}")
    except ValidationError as err:
        return refuse(f"{args.config}: {format_validation_error(err)}")

    from bloomrun.trainer.checkpoint import CheckpointError
    from bloomrun.trainer.data import DataError
    from bloomrun.trainer.faults import FaultHooks
    from bloomrun.trainer.identity import IdentityError
    from bloomrun.trainer.runlock import RunLocked
    from bloomrun.trainer.trainer import Trainer

    try:
        # Faults only where a test's environment asks for them (faults.py); none otherwise.
        trainer = Trainer(cfg, faults=FaultHooks.from_env())
    except RunLocked as err:
        # Exit 2 locally, but not a permanent verdict for the operator: a replaced pod may
        # find its predecessor's lock until that one is gone (or an NFS lease expires).
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, ValueError) as err:
        return refuse(str(err))
    try:
        return trainer.fit()
    except (IdentityError, CheckpointError) as err:  # another run's checkpoint, a bad warm start
        return refuse(str(err))
    finally:
        trainer.close()


def refuse(message: str) -> int:
    """A permanent error: one line on stderr and, in a pod, the container's termination
    message (the kubelet reads /dev/termination-log; the operator shows it in
    status.lastFailure). Exit 2: restarting would meet the same input."""
    print(f"error: {message}", file=sys.stderr)
    if os.path.exists(TERMINATION_LOG):
        try:
            with open(TERMINATION_LOG, "w") as log:
                # The operator reads the mark (reconcile.PERMANENT_MARK): torchrun's own exit
                # code (1) does not tell this from a lost peer. The kubelet keeps 4096 bytes.
                log.write((PERMANENT_MARK + message)[:4096])
        except OSError:
            pass  # not writable here (not a pod): stderr has it
    return 2


if __name__ == "__main__":
    sys.exit(main())
