"""The paper's ablations at small scale: `python -m alexnet_mp.ablations` (make ablations).

plan.py says which runs each comparison needs, runner.py trains them through the project's spawner
and trainer, measure.py turns their records into figures beside the paper's claims, and report.py
writes the table, the JSON and the plot. init_study.py runs the initialisation experiments of
docs/paper.md the same way, and init_signal.py measures how much of the image each init lets
through to each layer.
"""
from .measure import RunResult, Spread, load_result, steps_to_error, summarise
from .plan import COMPARISONS, Arm, Comparison, PlanError, RunSpec, plan_runs, select
from .report import markdown, write_report
from .runner import RUNTIME, AblationError, Job, job_config, run_all

__all__ = [
    "COMPARISONS", "RUNTIME", "AblationError", "Arm", "Comparison", "Job", "PlanError", "RunResult", "RunSpec",
    "Spread", "job_config", "load_result", "markdown", "plan_runs", "run_all", "select", "steps_to_error",
    "summarise", "write_report",
]
