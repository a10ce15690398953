"""`soho-scale validate JOB [KEY=VALUE ...]`: a job spec checked and printed resolved, with its
derived numbers and the DeepSpeed config the trainer would build; nothing starts. A local
`model.init_from` must name weights that exist (a file, a checkpoint, or a folder of them)."""

from __future__ import annotations

import argparse
import sys

import yaml

from data_pipeline.urls import is_s3_url
from soho_scale.engine.deepspeed_config import build_deepspeed_config
from soho_scale.preflight import check_init_from
from soho_scale.secrets import redact
from soho_scale.spec import SpecError, derived, dump_job, load_job


def validate_main(argv: list[str]) -> int:
    """`soho-scale validate JOB [KEY=VALUE ...]`: print the resolved job and its derived numbers."""
    parser = argparse.ArgumentParser(
        prog="soho-scale validate",
        description="Check a job spec; print it resolved, with derived numbers and DeepSpeed config.",
    )
    parser.add_argument("job", help="job YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.rest.lr=1e-4")
    parser.add_argument("--num-samples", type=int, help="dataset size, for epoch-based step counts")
    parser.add_argument("--world-size", type=int, help="ranks (default: resources.*)")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job, args.overrides)
        numbers = derived(job, args.num_samples, args.world_size)
        ds_config = build_deepspeed_config(job, numbers["world_size"])
    except SpecError as e:
        print(redact(str(e)), file=sys.stderr)
        return 2
    source = job.model.init_from
    if source and not is_s3_url(source):  # s3:// needs storage access: `soho-scale plan` checks
        check = check_init_from(source)  # the same check `soho-scale plan` runs
        if not check.ok:
            print(redact(check.detail), file=sys.stderr)
            return 2
    print(redact(dump_job(job)), end="")  # URLs shown without credentials
    print("---")
    summary = {"overrides": job.overrides, "derived": numbers, "deepspeed_config": ds_config}
    print(redact(yaml.safe_dump(summary, sort_keys=False)), end="")
    return 0
