"""soho_scale: SOHO vision-language pre-training from pixels, at cluster scale."""

__version__ = "0.1.0"
