"""The edge between a job spec and processes or schedulers: what starts ranks, and where.

- `local`: `soho-scale train` (the node launcher for N local ranks) and `soho-scale eval`
  (torchrun for N local ranks, or in this process for one).
- `node`: the node launcher, on every cluster node and under `soho-scale train`: starts the
  node's ranks, forwards stop signals to them and waits for their checkpoint.
- `rank`: the one rank entry point, `python -m soho_scale.launch.rank train|eval ...`, and
  `rank_module_args`, the one place a training rank's command line is built.
- `submit`: `soho-scale launch`, the multi-node command; it writes or runs what one of
  `hostfile` (DeepSpeed's runner across the hosts of a hostfile), `slurm` (an sbatch script) or
  `kubernetes` (an indexed Job and a headless Service) builds. `errors`: its ClusterError and
  the checks of user values. `pipeline_slurm`: a pipeline's stages as dependent Slurm jobs.
- `environment`: what travels to other nodes (non-secret settings by value, DeepSpeed's env
  file), and what never does (`soho_scale.secrets`).
- `validate`: `soho-scale validate`, a job spec resolved, with its derived numbers.

The DeepSpeed internals the hostfile runner relies on live in
`soho_scale.engine.patches.deepspeed_runner_env`.
"""
