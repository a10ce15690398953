"""`soho-scale` entry point: thin dispatch to the module that does the work.

Errors a user can cause (bad spec, missing shard, unreachable bucket) are printed as one line,
without a traceback, and exit with status 2 (SOHO_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from soho_scale.secrets import redact
from soho_scale.spec.errors import one_line


def _model_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soho-scale model-info")
    parser.add_argument("preset")
    args = parser.parse_args(argv)
    from soho_scale.model.soho import model_info

    print(json.dumps(model_info(args.preset), indent=2))
    return 0


def _data(argv: list[str]) -> int:
    from data_pipeline.cli import main as data_main

    return data_main(argv)


def _validate(argv: list[str]) -> int:
    from soho_scale.launch.validate import validate_main

    return validate_main(argv)


def _train(argv: list[str]) -> int:
    from soho_scale.launch.local import train_main

    return train_main(argv)


def _sync_tracking(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soho-scale sync-tracking")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from soho_scale.engine.tracking import sync_tracking

    print(f"sent {sync_tracking(args.run_dir)} tracking operations to MLflow")
    return 0


def _export(argv: list[str]) -> int:
    from soho_scale.engine.weights import export_main

    return export_main(argv)


def _plan(argv: list[str]) -> int:
    from soho_scale.plan import plan_main

    return plan_main(argv)


def _launch(argv: list[str]) -> int:
    from soho_scale.launch.submit import launch_main

    return launch_main(argv)


def _pipeline(argv: list[str]) -> int:
    from soho_scale.pipeline_cli import pipeline_main

    return pipeline_main(argv)


def _sweep(argv: list[str]) -> int:
    from soho_scale.sweep import sweep_main

    return sweep_main(argv)


def _report(argv: list[str]) -> int:
    from soho_scale.report import report_main

    return report_main(argv)


def _eval(argv: list[str]) -> int:
    from soho_scale.launch.local import eval_main

    return eval_main(argv)


COMMANDS = {
    "model-info": (_model_info, "print a preset's parameter and token counts as JSON"),
    "data": (_data, "synthetic world, dataset converters, shard listing, local S3 server"),
    "validate": (_validate, "check a job spec and print it resolved, with derived numbers"),
    "train": (_train, "train a job on N local ranks: soho-scale train JOB [K=V ...] [--nproc N]"),
    "eval": (_eval, "evaluate a checkpoint: eval JOB --checkpoint CKPT [--nproc N] [--out DIR]"),
    "pipeline": (_pipeline, "pre-train -> fine-tune -> eval stages, resumable: pipeline SPEC"),
    "sweep": (_sweep, "ablations of a pipeline over seeds, compared: sweep SPEC [--only V ...]"),
    "report": (_report, "results table + chart of an experiment: report --experiment NAME"),
    "plan": (_plan, "pre-flight: derived numbers, cost, and checks of storage, MLflow, shm, GPUs"),
    "launch": (_launch, "multi-node: --hostfile F | --scheduler slurm|k8s --nodes N --out F"),
    "export": (_export, "consolidated fp32 weights of a checkpoint: export CKPT --out model.pt"),
    "sync-tracking": (_sync_tracking, "upload a run's tracking kept offline while MLflow was down"),
}


def usage() -> str:
    lines = ["usage: soho-scale COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"soho-scale: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except ValueError as e:  # user errors are ValueErrors with a one-line message
        if os.environ.get("SOHO_DEBUG"):
            raise
        print(redact(one_line(f"soho-scale {command}: {e}")), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
