"""``srcid study``: the paper's Tables I-III and Fig. 3 from one command.

:mod:`srcid.study.grid` says which cells (training runs and their
evaluations) a preset's study has, :mod:`srcid.study.cells` what each cell
holds and whether it is finished, :mod:`srcid.study.runner` runs them as
subprocesses, resumably, :mod:`srcid.study.report` turns the cells' files
into tables and JSON, :mod:`srcid.study.plots` draws the figures and
:mod:`srcid.study.commands` is the command line.
"""
from srcid.study.cells import Settings
from srcid.study.grid import PLANS, Cell, Plan, build_grid, plan_for, select
from srcid.study.report import write_report
from srcid.study.runner import Runner, prepare_data

__all__ = ["PLANS", "Cell", "Plan", "Runner", "Settings", "build_grid", "plan_for", "prepare_data", "select",
           "write_report"]
