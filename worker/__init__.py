"""The training process (installed as ``ranger_ps.worker``)."""
