"""The parameter-server process: one process per shard (installed as ``ranger_ps.server``)."""
