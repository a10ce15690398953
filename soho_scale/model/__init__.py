"""The SOHO model: pure nn.Modules (no distributed code beyond the VD's all-reduce, no I/O)."""
