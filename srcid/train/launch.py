"""The trainer as an installed module, for processes started without a checkout.

One process: ``python -m srcid.train.launch ARGS``; N processes: ``deepspeed --num_gpus N --module
srcid.train.launch ARGS``. ``srcid study`` starts its trainings this way (:func:`srcid.run.train_command`), so a
plain ``pip install`` is enough; ``launcher/train.py`` is the same entry point as a script path, for the
commands typed in a checkout.
"""
import sys

from srcid.train.trainer import main

PROG = "python -m srcid.train.launch"

if __name__ == "__main__":
    sys.exit(main(prog=PROG))
