"""The gateway: one OpenAI endpoint for the whole pool, models attached on demand.

It runs inside the daemon process on its own port and calls `Pool.attach` / `Pool.detach`
directly (in threads: they block for seconds). The pool stays the source of truth: the
gateway finds its instances by their names, which are the models file's entry names.
"""
