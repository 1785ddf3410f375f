"""The dump layer: writing iterations. The copy pipeline (pages.py), one pre-dump or dump (iteration.py),
``wpdump checkpoint`` rounds and when to stop them (checkpoint.py, convergence.py), and the action script that
turns ``criu dump``'s final images into an increment on a wpdump chain (criu_hook.py)."""
