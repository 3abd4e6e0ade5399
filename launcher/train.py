#!/usr/bin/env python
"""Train SRCID or a DCID baseline.

GPU, N processes (NCCL):   deepspeed --num_gpus N launcher/train.py --model srcid --preset paper --data DATA --out RUN
CPU, 2 processes (gloo):   DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/train.py --model srcid --preset small --data DATA --out RUN
One process:               python launcher/train.py --model srcid --preset tiny --data DATA --out RUN

``--help`` lists every flag; ``--set key=value`` overrides any run-config key. Without a checkout the same
trainer is ``python -m srcid.train.launch`` / ``deepspeed --module srcid.train.launch`` (srcid/train/launch.py).
"""
import sys

from srcid.train.trainer import main

if __name__ == "__main__":
    # usage lines name this script as it was typed (python launcher/train.py, deepspeed ... launcher/train.py)
    sys.exit(main(prog=sys.argv[0]))
