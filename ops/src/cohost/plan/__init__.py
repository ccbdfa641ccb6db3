"""`cohost plan`: size vLLM servers so they all fit one GPU, or say what to change.

models    a model's shape from its config.json
memory    vLLM 0.26's memory accounting, calibrated on real GPUs
spec      what the operator asks for per service (`--service NAME=MODEL,...`)
sharing   how the servers share the GPU's compute: MPS shares and caps, or time-slicing
fit       the plan: budgets, KV caches, start order
suggest   the smallest changes that make a plan fit
text      the plan as the operator reads it
envfile   the plan as the env file compose and the launcher read
"""

from cohost.plan.fit import Plan, ServicePlan, fit
from cohost.plan.spec import PlanError, ServiceSpec
from cohost.plan.suggest import make_plan

__all__ = ["Plan", "PlanError", "ServicePlan", "ServiceSpec", "fit", "make_plan"]
