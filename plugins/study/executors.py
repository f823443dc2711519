"""Who runs a study's cells: this process, one after another (the default), or Ray tasks
on a Ray cluster (``--executor ray``). Either way each cell writes its records into the
study's cache folder, so results from any executor land in the same table; a Ray cluster
spanning machines needs the study directory on a filesystem they share."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcore.errors import ConfigError
from qcore.plugins import PluginManager, get_plugin_manager
from qcore_study.cache import CellFolder
from qcore_study.cells import CellOutcome, CellPlan, run_cell

OnDone = Callable[[CellPlan, CellOutcome], None]
EXECUTORS = ("sequential", "ray")


class SequentialExecutor:
    """Cells in this process, in grid order."""

    name = "sequential"

    def __init__(self, plugins: PluginManager | None = None) -> None:
        self.plugins = plugins

    def run(self, plans: list[CellPlan], root: Path, on_done: OnDone,
            on_start: Callable[[CellPlan], None] | None = None) -> None:
        for plan in plans:
            if on_start is not None:
                on_start(plan)
            on_done(plan, run_cell(plan, root, self.plugins))


def _ray_cell(plan: dict[str, Any], root: str) -> dict[str, Any]:
    """A Ray task: one cell in a worker process (plans travel as plain data)."""
    outcome = run_cell(CellPlan.model_validate(plan), Path(root))
    return outcome.as_dict()


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray needs Ray: pip install 'qcore[ray]' (or "
                          "pip install ray)") from exc
    return ray


def cell_resources(accelerator: str | None) -> dict[str, float]:
    """What one cell asks of the cluster on a backend whose
    :attr:`~qcore.interfaces.Backend.accelerator` is ``accelerator``: one CPU, plus one of
    that accelerator (``GPU``, ``NPU``) when the backend has one (None: the CPU alone)."""
    return {"CPU": 1.0, **({accelerator: 1.0} if accelerator else {})}


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """:func:`cell_resources` as ``ray.remote(...).options`` keywords: ``CPU`` becomes
    ``num_cpus``, ``GPU`` ``num_gpus``, any other accelerator a custom resource."""
    rest = dict(resources)
    return {"num_cpus": rest.pop("CPU", 1.0), "num_gpus": rest.pop("GPU", 0.0),
            "resources": rest}


class RayExecutor:
    """Each cell is a Ray task asking for one CPU and one of its backend's accelerator
    (:func:`cell_resources`). ``address`` joins a running cluster
    (``ray.init(address=...)``); without one a local cluster starts with ``num_cpus`` CPUs
    and its session files in a temporary folder removed afterwards."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 plugins: PluginManager | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.plugins = plugins or get_plugin_manager()

    def run(self, plans: list[CellPlan], root: Path, on_done: OnDone,
            on_start: Callable[[CellPlan], None] | None = None) -> None:
        if not plans:
            return
        ray = import_ray()
        temp = None
        started = not ray.is_initialized()
        if started:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:  # short path: Ray's socket names must stay under 107 characters
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                temp = tempfile.mkdtemp(prefix="qcore-ray-")
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1,
                         include_dashboard=False, _temp_dir=temp, log_to_driver=False)
        try:
            task = ray.remote(_ray_cell)
            pending: dict[Any, CellPlan] = {}
            for plan in plans:
                cls = self.plugins.get("backend", plan.cell.backend)
                options = ray_options(cell_resources(cls.accelerator))
                ref = task.options(**options).remote(plan.model_dump(mode="json"),
                                                     str(root.resolve()))
                pending[ref] = plan
                if on_start is not None:
                    on_start(plan)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    plan = pending.pop(ref)
                    try:
                        outcome = CellOutcome(**ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - a lost worker fails its cell
                        CellFolder(root, plan.key).record_failure("worker", exc)
                        outcome = CellOutcome(label=plan.cell.label, ran=[],
                                              failed=["worker"], seconds=0.0)
                    on_done(plan, outcome)
        finally:
            if started:
                ray.shutdown()
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None,
                  plugins: PluginManager | None = None) -> SequentialExecutor | RayExecutor:
    if name == "sequential":
        return SequentialExecutor(plugins)
    if name == "ray":
        import_ray()  # fail before any work when it is missing
        return RayExecutor(address, num_cpus, plugins)
    raise ConfigError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
