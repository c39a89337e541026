"""The Globus Compute task's old module path, kept because it is wire format.

Tasks queued at an interchange before an upgrade name
``warmpool._gce_task.run_invocation`` (serialised by module and name); they
keep loading through this module. The task lives in
:mod:`warmpool.globus_compute.task`. ``tests/golden`` checks every such path.
"""

from warmpool.globus_compute.task import run_invocation

__all__ = ["run_invocation"]
