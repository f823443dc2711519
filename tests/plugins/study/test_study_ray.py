import pytest

from qcore_study import run_study
from qcore_study.executors import RayExecutor, cell_resources, ray_options

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

DETERMINISTIC = ("perplexity", "nll", "max_alone", "worst_layer", "final_accumulated",
                 "int_kernel_calls")


def _numbers(result):
    return {(r["method"], r["scheme"]): (r["status"], r["size_mb"], {
        label: {k: v for k, v in metrics.items() if k in DETERMINISTIC}
        for label, metrics in r["evals"].items()}) for r in result.rows}


def test_ray_executor_gives_the_sequential_table(make_grid, tmp_path, one_thread):
    grid = make_grid()
    sequential = run_study(grid, tmp_path / "seq")
    lines = []
    distributed = run_study(grid, tmp_path / "ray", executor="ray", ray_cpus=2,
                            report=lines.append)
    assert not ray.is_initialized()  # the local cluster it started is gone
    assert distributed.ran == 4 and not distributed.failed
    assert "(ray executor)" in lines[0] and sum("done" in line for line in lines) == 4
    assert _numbers(distributed) == _numbers(sequential)
    # the rerun finds every cell in the cache and starts no cluster
    assert run_study(grid, tmp_path / "ray", executor="ray").ran == 0


def test_backend_resources_become_ray_options():
    assert ray_options({"CPU": 1.0}) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    assert ray_options({"CPU": 2.0, "NPU": 1.0}) == {"num_cpus": 2.0, "num_gpus": 0.0,
                                                     "resources": {"NPU": 1.0}}
    # a cell asks for one CPU and one of its backend's accelerator (Backend.accelerator)
    assert ray_options(cell_resources(None)) == {"num_cpus": 1.0, "num_gpus": 0.0,
                                                 "resources": {}}
    assert ray_options(cell_resources("GPU")) == {"num_cpus": 1.0, "num_gpus": 1.0,
                                                  "resources": {}}
    assert ray_options(cell_resources("NPU")) == {"num_cpus": 1.0, "num_gpus": 0.0,
                                                  "resources": {"NPU": 1.0}}
    assert RayExecutor().name == "ray"
