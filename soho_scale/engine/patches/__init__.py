"""Every place soho_scale reaches into DeepSpeed's internals, one module per patched behaviour;
`data_pipeline/patches/guard.py` says what each declares and how it is kept honest."""

MODULES = (
    "soho_scale.engine.patches.deepspeed_zero3",
    "soho_scale.engine.patches.deepspeed_shm_comm",
    "soho_scale.engine.patches.deepspeed_shm_segment",
    "soho_scale.engine.patches.deepspeed_runner_env",
)
