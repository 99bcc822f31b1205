"""`granite-ray <stage> [--config FILE] [key.sub=value ...]`, and `granite-ray demo`.

jobs/<stage>.py calls `main` too, so `ray job submit -- python jobs/<stage>.py` and the CLI
reach the same code.
"""

from __future__ import annotations

import argparse
import sys

from granite_ray.config import load_config
from granite_ray.errors import TrainingFailed, UserError
from granite_ray.pipeline import PipelineError, run_pipeline_cli


def build_parser() -> argparse.ArgumentParser:
    from granite_ray.stages.registry import STAGES

    parser = argparse.ArgumentParser(prog="granite-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. train.lr=1e-4)")
    pipeline = sub.add_parser("pipeline", help="run stages in order as Ray jobs, chained by artifact URIs, resumable")
    pipeline.add_argument("--config", required=True, help="pipeline YAML (see configs/pipelines/)")
    pipeline.add_argument("--address", help="Ray dashboard URL; default: the file's address, RAY_ADDRESS, else an embedded local Ray")
    pipeline.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline's top-level fields (e.g. output_uri=s3://b/p)")
    demo = sub.add_parser("demo", help="every stage on the tiny preset, on real data, as Ray jobs on an embedded local Ray; then Serve")
    demo.add_argument("--output", default="outputs/demo", help="output directory (re-runs skip the stages done there)")
    demo.add_argument("--exit", action="store_true", help="stop after calling the endpoints instead of serving until Ctrl-C")
    demo.add_argument("overrides", nargs="*", help="pipeline overrides, e.g. variables.serve_port=8100")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pipeline":
            return run_pipeline_cli(args.config, args.address, args.overrides)
        if args.command == "demo":
            from granite_ray.demo import run_demo

            run_demo(args.output, args.overrides, keep_serving=not args.exit)
            return 0
        from granite_ray.stages.registry import STAGES

        stage = STAGES[args.command]
        config = load_config(stage.config_cls, args.config, [f"stage={args.command}", *args.overrides])
        stage.run(config)
        return 0
    except (UserError, FileNotFoundError) as err:  # ConfigError, DatasetError, a missing file or model folder
        print(f"granite-ray {args.command}: {err}", file=sys.stderr)
        return 2
    except (PipelineError, TrainingFailed) as err:
        print(f"granite-ray {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a pipeline has already stopped its running job and marked the stage stopped
        print(f"granite-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
