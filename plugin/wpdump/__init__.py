"""wpdump: incremental checkpoints of live Linux processes (userfaultfd async write-protect + PAGEMAP_SCAN),
written as CRIU image chains. Layers, each importing only those below it: errors/ranges/ipc (base) ->
target (kernel operations on the target) -> tracking (tracker, keeper, session) -> images (CRIU format,
chains, directories) -> dump (copy pipeline, iterations, checkpoint, criu-hook) -> chainops (show, check,
verify, squash, dedup, rollback) -> cli."""
