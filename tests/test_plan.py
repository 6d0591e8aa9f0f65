"""The plan's arithmetic on the node types of cluster/aws.yaml and on one H100, its refusals, and
its agreement with the code it plans for (Ray's object-store default, the kernels' tiles and
column chunks, cluster/aws.yaml, docs/scaling.md)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from entk_ray import kernels as kern
from entk_ray import plan as P
from entk_ray.config import PLAN_HARDWARE, PLAN_KERNEL_DTYPES, Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
N_TOTAL, P_FULL = 47_600, 500_000


def full_plan(hardware: str, enforce: bool = True, **plan_fields):
    return P.make_plan(P.living17_config(hardware=hardware, **plan_fields), enforce=enforce)


def tiles(rows: int, t: int) -> list[int]:
    return [min(t, rows - s) for s in range(0, rows, t)]


def kernel_work(t: int, n: int = 44_200, evals=(1_700, 1_700)) -> tuple[float, float]:
    """(FLOPs, rows copied) of the tile tasks, counted independently of the plan: every train
    pair A ≤ B (a diagonal tile copied once) and every (eval tile, train tile) pair."""
    train = tiles(n, t)
    flops = rows = 0.0
    for i, a in enumerate(train):
        for j in range(i, len(train)):
            b = train[j]
            flops += 2 * P_FULL * a * b
            rows += a if i == j else a + b
    for m in evals:
        for a in tiles(m, t):
            for b in train:
                flops += 2 * P_FULL * a * b
                rows += a + b
    return flops, rows


# --------------------------------------------------------------------------------------------
# The presets are the node types of cluster/aws.yaml, and Ray sizes their object store as we say
# --------------------------------------------------------------------------------------------
def test_presets_match_cluster_yaml():
    raw = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    shm = next(opt for opt in raw["docker"]["run_options"] if opt.startswith("--shm-size="))
    assert shm == "--shm-size=64g"
    for node_type in raw["available_node_types"].values():
        cfg = node_type["node_config"]
        preset = P.PRESETS[cfg["InstanceType"]]
        assert preset.shm_bytes == 64 * 2**30
        assert preset.disk_bytes == cfg["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] * 2**30
        resources = node_type["resources"]
        if resources:  # the GPU workers declare theirs
            assert (preset.cpus, preset.gpus) == (resources["CPU"], resources["GPU"])
    assert P.PRESETS["g5.12xlarge"].gpu_type == "A10G" and P.PRESETS["g5.12xlarge"].ram_bytes == 192 * 2**30
    assert P.PRESETS["p4d.24xlarge"].gpu_memory_bytes == 40 * GB and P.PRESETS["p4d.24xlarge"].ram_bytes == 1152 * 2**30
    assert P.PRESETS["r6i.8xlarge"].gpus == 0 and P.PRESETS["r6i.8xlarge"].cpus == 32


def test_config_choices_and_kernel_constants_agree_with_the_code():
    assert PLAN_HARDWARE[2:] == tuple(P.PRESETS)
    assert PLAN_KERNEL_DTYPES[1:] == tuple(kern.COMPUTE_DTYPES)
    assert P.GPU_COLUMN_CHUNK == kern.GPU_COLUMN_CHUNK and P.CPU_COLUMN_CHUNK == kern.DEFAULT_COLUMN_CHUNK


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_default_object_store_is_rays(name, monkeypatch):
    """Ray's own resolve_object_store_memory, given the preset's RAM and /dev/shm, agrees."""
    import ray._private.utils as ray_utils

    node = P.PRESETS[name]
    monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda: int(node.shm))
    assert ray_utils.resolve_object_store_memory(int(node.ram_bytes)) == pytest.approx(node.default_object_store(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Full Living-17 on each node type
# --------------------------------------------------------------------------------------------
def test_h100_fits_with_bfloat16_in_a_raised_object_store():
    plan = full_plan("h100")
    assert plan.fits
    # float32 Φ: 95.2 GB > 0.95 × /dev/shm (half of 128 GiB) = 65.3 GB: it would spill; bfloat16 fits in memory.
    assert plan.storage_dtype == "bfloat16" and plan.phi_bytes == N_TOTAL * P_FULL * 2
    node = P.PRESETS["h100"]
    assert node.default_object_store() == pytest.approx(0.3 * 128 * 2**30)
    assert plan.phi_bytes * 1.05 > node.default_object_store()  # Ray's default is too small ...
    assert plan.object_store_bytes == math.ceil(plan.phi_bytes * 1.05 / GB) * GB  # ... the plan raises it
    assert plan.object_store_bytes <= 0.95 * node.shm and plan.spill_bytes == 0
    # Tiles: whole shards, ≥ 2,048 rows, two tasks per GPU, and each task fits half the GPU.
    assert plan.tile_rows >= 2048 and plan.tile_rows % plan.shard_size == 0 and plan.block_gpus == 0.5
    planner = P._Planner(P._inputs(P.living17_config(), True), P.LIVING17_FULL, P.preset("h100"))
    assert planner._task_gpu_bytes(plan.tile_rows, plan.tile_rows, "bfloat16", plan.kernel_dtype) <= 0.9 * 80 * GB / 2
    assert plan.kernel_dtype == "float64" and plan.kernel_device == "cuda"
    # Stage times are the documented arithmetic.
    assert plan.stage("features").seconds == pytest.approx(N_TOTAL / 296)
    flops, rows = kernel_work(plan.tile_rows)
    assert plan.stage("kernels").seconds == pytest.approx(max(flops / 45e12, rows * P_FULL * 2 / 20e9))
    # float64 eigh needs 6 n² × 8 B = 94 GB > 72 GB: the batched NAG on the GPU, in float64.
    assert (plan.solver, plan.solver_device, plan.solver_dtype) == ("gpu-nag-float64", "cuda", "float64")
    step = max(2 * 44_200**2 * 17 * 9 / 45e12, 8 * 44_200**2 / 3350e9)
    evals = 3 * 100 * 2 * 3_400 * 44_200 * 17 * 9 / 45e12
    assert plan.stage("solver").seconds == pytest.approx(3 * 1000 * step + evals)
    assert plan.total_seconds < 600  # the target: full Living-17 in ≤ 10 min on one H100
    text = plan.format()
    for line in ("47,600 × 500,000 × 2 B = 47.6 GB", "start Ray with object_store_memory = 50.0 GB",
                 "named kernel_tile", "gpu-nag-float64", "Fits."):
        assert line in text


def test_g5_fits_with_bfloat16_float32_tiles_and_cpu_eigh():
    plan = full_plan("g5.12xlarge")
    assert plan.fits and plan.storage_dtype == "bfloat16"
    node = P.PRESETS["g5.12xlarge"]
    assert node.default_object_store() == pytest.approx(0.3 * 192 * 2**30)  # below 0.95 × 64 GiB
    assert plan.object_store_bytes is None  # 50 GB fits Ray's default 61.8 GB
    # The A10G's float64 rate is 1/31 of its float32 rate: kernels in float32.
    assert plan.kernel_dtype == "float32" and plan.tile_rows >= 2048
    assert plan.stage("features").seconds == pytest.approx(N_TOTAL / (4 * 60))
    flops, rows = kernel_work(plan.tile_rows)
    assert plan.stage("kernels").seconds == pytest.approx(max(flops / (4 * 21.8e12), rows * P_FULL * 2 / (4 * 20e9)))
    # K does not fit an A10G for eigh; 48 cores run it: 14.6 s × (44,200 / 8,192)³ × 16/48.
    assert plan.solver == "cpu-spectral-float64"
    eigh = 14.6 * (44_200 / 8_192) ** 3 * 16 / 48
    assert eigh < plan.stage("solver").seconds < eigh + 60


def test_p4d_shm_caps_the_object_store_so_bfloat16():
    plan = full_plan("p4d.24xlarge")
    assert plan.fits and plan.storage_dtype == "bfloat16"
    node = P.PRESETS["p4d.24xlarge"]
    # 30 % of 1,152 GiB is 371 GB, but Ray caps the default at 0.95 × /dev/shm (64 GiB in cluster/aws.yaml).
    assert node.default_object_store() == pytest.approx(0.95 * 64 * 2**30)
    assert plan.kernel_dtype == "float64" and plan.solver == "gpu-nag-float64"
    assert plan.stage("features").seconds == pytest.approx(N_TOTAL / (8 * 200))
    # float32 would fit with a larger /dev/shm: the plan says how.
    forced = full_plan("p4d.24xlarge", storage_dtype="float32")
    assert forced.fits and forced.spill_bytes > 0  # 100 GB > 65.3 GB: spills to the 500 GiB volume


def test_cpu_head_node_alone_runs_everything_on_cpus():
    plan = full_plan("r6i.8xlarge")
    assert plan.fits and plan.kernel_device == "cpu" and plan.block_gpus == 0 and plan.solver.startswith("cpu-")
    assert plan.tile_rows == 1024 and plan.max_blocks_in_flight == 32
    assert plan.stage("features").seconds == pytest.approx(N_TOTAL / (0.32 * 32))
    assert plan.stage("kernels").seconds == pytest.approx(kernel_work(1024)[0] / (41e9 * 32))


def test_cluster_of_two_g5_with_a_head_spreads_phi_and_fetches_tiles():
    one = full_plan("g5.12xlarge")
    two = full_plan("g5.12xlarge", nodes=2, head="r6i.8xlarge")
    assert two.fits and two.resources.gpus == 8 and two.resources.driver_node.name == "r6i.8xlarge"
    assert two.stage("features").seconds == pytest.approx(one.stage("features").seconds / 2)
    assert "tiles from other nodes" in two.format()
    # 8 A10Gs share the 9 β of a round (2 each): faster than eigh on the head's 32 cores.
    assert two.solver == "gpu-nag-float64" and "9 β per round over 8 GPU(s) = 2 per GPU" in two.format()
    step = 2 * 44_200**2 * 17 * 2 / 0.7e12
    assert two.stage("solver").seconds == pytest.approx(3 * 1000 * step + 3 * 100 * 2 * 3_400 * 44_200 * 17 * 2 / 0.7e12)
    assert two.stage("solver").seconds < 14.6 * (44_200 / 8_192) ** 3 * 16 / 32


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def test_float32_on_a_24gb_gpu_with_64gb_ram_is_refused_naming_the_shortfall():
    cfg = P.living17_config(**P.REFUSED_EXAMPLE)
    with pytest.raises(P.PlanError) as info:
        P.make_plan(cfg)
    message = str(info.value)
    assert "Φ needs 95.2 GB in float32 (forced by plan.storage_dtype)" in message
    # Ray's store lives in /dev/shm (half of 64 GB): at most 0.95 × 32 GB; spilling gets 80 % of 64 GB.
    assert "object store of at most 30.4 GB" in message and "51.2 GB of disk for spilling" in message
    assert "hold 81.6 GB" in message
    assert "--storage-dtype bfloat16" in message and "plan.nodes=2" in message
    assert info.value.plan is not None and not info.value.plan.fits
    # Not enforced: the same plan comes back with its shortfalls.
    plan = P.make_plan(cfg, enforce=False)
    assert not plan.fits and plan.shortfalls[0].startswith("Φ needs 95.2 GB")
    # With the dtype left to the plan, bfloat16 fits by spilling part of Φ to disk.
    auto = P.make_plan(P.living17_config(**{**P.REFUSED_EXAMPLE, "storage_dtype": "auto"}))
    assert auto.fits and auto.storage_dtype == "bfloat16"
    assert auto.spill_bytes == pytest.approx(47.6e9 * 1.05 - 0.95 * 32e9)


def test_a_feature_batch_too_large_for_the_gpu_is_refused_with_a_batch_that_fits():
    cfg = P.living17_config(hardware="g5.12xlarge")
    cfg.features.batch_size = 128  # ≈ 39 GB of GPU memory > 21.6 GB usable on an A10G
    with pytest.raises(P.PlanError, match="a feature batch of 128 needs 39.0 GB") as info:
        P.make_plan(cfg)
    assert "--batch-size 70" in str(info.value)


def test_forced_float64_spectral_solver_that_does_not_fit_is_refused():
    with pytest.raises(P.PlanError, match="plan.solver=gpu-spectral-float64: 96.2 GB of GPU memory > 72.0 GB"):
        full_plan("h100", solver="gpu-spectral-float64")
    forced32 = full_plan("h100", solver="gpu-spectral-float32")  # 6 n² × 4 B = 47 GB: fits, as measured
    assert forced32.solver_dtype == "float32" and forced32.stage("solver").seconds == pytest.approx(
        35 + (2 * 3_400 * 44_200**2 + 27 * 100 * 2 * 3_400 * 44_200 * 17) / 40e12)


def test_ten_times_the_data_is_refused():
    plan = P.make_plan(P.living17_config(hardware="p4d.24xlarge", nodes=2), P.LIVING17_FULL.scaled(10), enforce=False)
    assert not plan.fits and plan.storage_dtype == "bfloat16" and plan.spill_bytes > 0  # float32: 952 GB
    # K alone is 442,000² × 8 B = 1.56 TB: more than a p4d's RAM, and no solver can hold it.
    assert any(s.startswith("host memory on p4d.24xlarge (driver)") for s in plan.shortfalls)
    assert any(s.startswith("no float64 solver fits") for s in plan.shortfalls)


# --------------------------------------------------------------------------------------------
# Sizes, resources, config
# --------------------------------------------------------------------------------------------
def test_sizes_from_config():
    cfg = P.living17_config()
    assert P.sizes_from_config(cfg) == P.LIVING17_FULL
    assert (P.LIVING17_FULL.n_train, P.LIVING17_FULL.n_eval, P.LIVING17_FULL.num_classes) == (44_200, 3_400, 17)
    small = Config()  # digits, 1,000 + 500 + 500
    sizes = P.sizes_from_config(small)
    assert (sizes.n_train, dict(sizes.evals), sizes.num_classes) == (1000, {"id_val": 500, "ood": 500}, 10)
    folder = Config().with_overrides(["data.benchmark=image_folder", "data.n_train=null"])
    with pytest.raises(P.PlanError, match="not known without its data"):
        P.sizes_from_config(folder)


def test_small_default_run_fits_here_and_keeps_its_settings():
    cfg = Config()
    plan = P.make_plan(cfg, resources=P.custom_resources(cpus=2, ram_gb=24, disk_gb=50))
    assert plan.fits and plan.storage_dtype == "float32" and plan.object_store_bytes is None
    applied = plan.apply(cfg)
    assert applied.features.storage_dtype == "float32" and applied.solver.method == "spectral"
    assert cfg.ray.max_blocks_in_flight == 8  # apply() copies


def test_apply_writes_the_plans_choices_into_a_config_copy():
    cfg = P.living17_config(hardware="h100")
    plan = P.make_plan(cfg)
    applied = plan.apply(cfg)
    assert applied.features.storage_dtype == "bfloat16" and applied.ray.block_gpus == 0.5
    assert applied.solver.method == "nag" and applied.features.num_workers == plan.decode_workers >= 1
    assert cfg.features.storage_dtype == "float32"


def test_resources_from_ray_nodes_groups_identical_nodes():
    def node(cpus, gpus, accel=None, alive=True):
        res = {"CPU": cpus, "memory": 100 * GB, "object_store_memory": 40 * GB}
        if gpus:
            res.update({"GPU": gpus, f"accelerator_type:{accel}": 1.0})
        return {"Alive": alive, "Resources": res}

    resources = P.resources_from_ray_nodes([node(32, 0), node(48, 4, "A10G"), node(48, 4, "A10G"),
                                            node(48, 4, "A10G", alive=False)], disk_bytes=300 * GB)
    assert resources.gpus == 8 and resources.nodes == 3 and resources.gpu_type == "A10G"
    gpu_node, count = resources.workers[0]
    assert count == 2 and gpu_node.gpu_memory_bytes == 24 * GB and gpu_node.ram_bytes == 140 * GB
    assert gpu_node.object_store() == 40 * GB
    with pytest.raises(P.PlanError, match="no live node"):
        P.resources_from_ray_nodes([node(4, 0, alive=False)])


def test_local_resources_and_auto_detection_need_no_ray():
    here = P.local_resources()
    node = here.workers[0][0]
    assert node.cpus >= 1 and node.ram_bytes > 1 * GB and node.disk_bytes > 0
    assert P.resources_from_config(Config()).name in ("this machine", "connected Ray cluster")


@pytest.mark.parametrize("override,message", [
    ("plan.hardware=tpu", "plan.hardware must be one of auto, custom, h100"),
    ("plan.nodes=0", "plan.nodes must be a positive integer, got 0"),
    ("plan.storage_dtype=int8", "plan.storage_dtype must be one of auto, float32, float16, bfloat16"),
    ("plan.kernel_dtype=fp8", "plan.kernel_dtype must be one of auto, float64, float32, tf32, bf16"),
    ("plan.solver=magic", "plan.solver must be one of auto, gpu-spectral-float64"),
    ("plan.ram_gb=0", "plan.ram_gb must be a positive number of GB, got 0"),
    ("plan.enforce=maybe", "plan.enforce must be true or false"),
    ("plan.head=laptop", "plan.head must be one of h100, g5.12xlarge"),
])
def test_plan_config_is_validated(override, message):
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override]).validate(check_paths=False)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------
# The trained baselines' sweep
# ------------------------------------------------------------------------------------------------
def sweep_config(hardware, **finetune):
    cfg = P.living17_config(hardware=hardware)
    for key, value in finetune.items():
        setattr(cfg.finetune, key, value)
    return cfg


def test_finetune_sweep_on_one_h100_from_the_measured_rates():
    f = P.plan_finetune_sweep(sweep_config("h100", precision="fp32", cpus_per_worker=16))
    assert (f.trials, f.epochs, f.images_per_epoch, f.eval_images) == (21, 20, 690 * 64, 3400)
    assert f.gpu_rate == 1781 and f.decode_rate == pytest.approx(15 * 1000 / 8)  # 15 loader processes
    expected = (20 * 44160 + 21 * 3400 / 3) / 1781 + 25
    assert f.trial_seconds == pytest.approx(expected) and f.sweep_seconds == pytest.approx(21 * expected)
    bf16 = P.plan_finetune_sweep(sweep_config("h100", cpus_per_worker=16))  # auto: bf16 on a GPU
    assert bf16.precision == "bf16" and bf16.gpu_rate == 2754
    assert bf16.rate == bf16.decode_rate < bf16.gpu_rate  # 16 CPUs cannot feed the bf16 rate
    assert bf16.gpu_bytes < f.gpu_bytes < 16e9 and f.checkpoint_bytes == pytest.approx(205e6, rel=0.01)
    # one CPU per worker decodes in the training process itself: 125 images/s
    assert P.plan_finetune_sweep(sweep_config("h100")).rate == pytest.approx(125)


def test_finetune_sweep_waves_follow_methods_learning_rates_and_gpus():
    p4d = P.plan_finetune_sweep(sweep_config("p4d.24xlarge", cpus_per_worker=12))
    assert (p4d.at_once, p4d.waves, p4d.gpu_type) == (8, 3, "A100-40G")  # one Tune run per method: 7 of 8 GPUs
    g5 = P.plan_finetune_sweep(sweep_config("g5.12xlarge", cpus_per_worker=12, baselines=["ft"],
                                            lr_grid=[1e-3, 1e-2]))
    assert (g5.trials, g5.at_once, g5.waves) == (2, 4, 1)
    ddp = P.plan_finetune_sweep(sweep_config("p4d.24xlarge", cpus_per_worker=12, num_workers=2))
    assert ddp.at_once == 4 and ddp.gpu_rate == 2 * p4d.gpu_rate and ddp.gpu_bytes < p4d.gpu_bytes
    with pytest.raises(P.PlanError, match="no GPU"):
        P.plan_finetune_sweep(sweep_config("r6i.8xlarge"))
    with pytest.raises(P.PlanError, match="cpus_per_worker=16 exceeds the 12 CPUs per GPU"):
        P.plan_finetune_sweep(sweep_config("g5.12xlarge", cpus_per_worker=16))


# --------------------------------------------------------------------------------------------
# The command line and docs/scaling.md
# --------------------------------------------------------------------------------------------
def test_module_command_prints_the_plan_or_refuses(capsys):
    assert P.main(["--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan: living17 · resnet50 at 224 px · p = 500,000 · Ray") and "Fits." in out
    args = ["--hardware", "custom", "--storage-dtype", "float32", "--set", "plan.gpus=1", "--set", "plan.gpu_type=A10G",
            "--set", "plan.gpu_memory_gb=24", "--set", "plan.ram_gb=64", "--set", "plan.disk_gb=64"]
    assert P.main(args) == 2
    captured = capsys.readouterr()
    assert "Does not fit: Φ needs 95.2 GB in float32" in captured.out and "PlanError" in captured.err


def test_docs_scaling_tables_are_the_codes_output():
    """docs/scaling.md pastes the planner's output; after changing a rate or a rule, run
    `python scripts/plan_tables.py --write docs/scaling.md`."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert P.update_doc(doc) == doc
    assert P.markdown_tables() in doc and P.make_plan(P.living17_config(hardware="h100")).format() in doc
    with pytest.raises(ValueError, match="no <!-- plan-tables: begin -->"):
        P.update_doc("# no regions")
