"""A deterministic discrete-event simulator of a skyhop fleet (docs/simulator.md).

It runs the live broker's pure cores — ``Fleet``, ``place``, ``scale`` — and the agent's
queue and estimator against modelled nodes, networks and arrivals, so that placement and
autoscaling can be judged at a scale one machine cannot host::

    from sim import load_scenario, simulate
    report = simulate(load_scenario("flash-crowd"), policy="deadline", seed=1)
"""

from sim.engine import SIM_AUTOSCALERS, Simulation, simulate
from sim.report import dumps
from sim.scenario import BUILTIN, Scenario, load_scenario

__all__ = ["BUILTIN", "SIM_AUTOSCALERS", "Scenario", "Simulation", "dumps", "load_scenario",
           "simulate"]
