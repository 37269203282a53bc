"""Training scripts written as a user writes them, runnable with ``ranger-ps launch -m ranger_ps.examples.NAME``.

They import ranger-ps only through its public names (``ranger_ps.Ranger``, ``ranger_ps.init``),
as a user's script does; nothing in the library imports them.
"""
