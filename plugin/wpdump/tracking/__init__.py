"""The tracking layer: write tracking with userfaultfd async write-protect. The tracker harvests what changed
each round (tracker.py, pinned.py for buffers the kernel writes behind it), a keeper process holds it between
commands (keeper.py), and the keeper session checks it out, adopts it and checks it back in for every
command that writes with it (session.py)."""
