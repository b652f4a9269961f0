"""``aegis demo``: a small multi-agent system on a real Aegis stack, and the reference scenarios.

:mod:`.stack` starts (or attaches to) the control plane, a gateway and two tool servers; the
scenarios in :mod:`.scenarios` drive agents through the SDK and report each outcome. The CLI face
is :mod:`aegis.cli.demo`. Nothing here is needed to run Aegis itself.
"""

from __future__ import annotations

from aegis.demo.scenarios import Outcome, run_scenarios
from aegis.demo.stack import DemoStack

__all__ = ["DemoStack", "Outcome", "run_scenarios"]
