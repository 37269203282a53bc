"""Configuration: the settings dataclasses of the optimizer, the worker, the servers and the commands.

Each setting is declared once, here or in the algorithm layer (:mod:`ranger_ps.settings`); flags,
environment variables, config-file keys, Python keywords and report keys are derived from them.
"""
