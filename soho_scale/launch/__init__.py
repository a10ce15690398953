"""The edge between a job spec and processes or schedulers: what starts ranks, and where.

- `local`: `soho-scale train` (DeepSpeed's per-node launcher for N local ranks, signals forwarded
  to the ranks) and `soho-scale eval` (torchrun for N local ranks, or in this process for one).
- `rank`: the one rank entry point, `python -m soho_scale.launch.rank train|eval ...`, and
  `rank_module_args`, the one place a training rank's command line is built.
- `submit`: `soho-scale launch`, the multi-node command; it writes or runs what one of
  `hostfile` (DeepSpeed's runner across the hosts of a hostfile), `slurm` (an sbatch script) or
  `kubernetes` (an indexed Job and a headless Service) builds. `errors`: its ClusterError.
- `environment`: what travels to other nodes (non-secret settings by value, DeepSpeed's env
  file), and what never does (`soho_scale.secrets`).
- `validate`: `soho-scale validate`, a job spec resolved, with its derived numbers.

DeepSpeed internals these rely on live in `soho_scale.engine.patches` (`deepspeed_launcher`,
`deepspeed_runner_env`).
"""
