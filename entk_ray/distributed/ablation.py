"""The ablation grid on Ray: one task per feature pass (map × seed), one per cell's sweep.

Thin: the work is :func:`entk_ray.ablation.compute_group` and :func:`entk_ray.ablation.solve_cell`;
here they become Ray tasks. A group's cells are submitted as soon as its kernels are stored, so
feature passes, kernel builds and sweeps of different groups overlap; the linear probe runs
beside them. Tasks read and write the artifact store (a local folder on one machine, ``s3://`` on
a cluster), so nothing large travels through the object store.
"""
from __future__ import annotations

from collections.abc import Callable

import ray

from entk_ray.ablation import Group, compute_group, linear_probe_reference, solve_cell
from entk_ray.config import Config
from entk_ray.distributed.runtime import init_ray, shutdown_ray


@ray.remote(num_cpus=1)
def ablation_features(cfg: Config, group: Group, varies: str, setup) -> dict:
    return compute_group(cfg, group, varies, setup)


@ray.remote(num_cpus=1)
def ablation_cell(cfg: Config, cell: dict, setup) -> dict:
    return solve_cell(cfg, cell, setup)


@ray.remote(num_cpus=1)
def ablation_probe(cfg: Config, setup) -> dict:
    return linear_probe_reference(cfg, setup)


def run_on_ray(cfg: Config, groups: list[Group], varies: str, logger: Callable[[str], None], setup):
    """(group infos, cell results in grid order, probe) with every group and cell as a Ray task."""
    connection = init_ray(cfg.ray.address)
    try:
        pending = {ablation_features.options(name=f"ablation_features:{g.name}").remote(cfg, g, varies, setup): g
                   for g in groups}
        probe_ref = ablation_probe.remote(cfg, setup)
        cell_refs, infos = {}, {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            info = ray.get(ready[0])
            infos[group.name] = info
            logger(f"{group.name}: kernels {'computed' if info['computed'] else 'reused'} in {info['seconds']:.1f}s")
            for cell in info["cells"]:
                name = f"{cell['spec']}/p{cell['p']}/seed{cell['seed']}"
                cell_refs[name] = ablation_cell.options(name=f"ablation_cell:{name}").remote(cfg, cell, setup)
        cells = ray.get(list(cell_refs.values()))
        probe = ray.get(probe_ref)
    finally:
        shutdown_ray(connection)
    return [infos[g.name] for g in groups], cells, probe
