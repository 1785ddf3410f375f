"""``wpdump-criu``: a drop-in ``criu`` for container runtimes (runc, crun, podman, LXC).

It answers CRIU's memory-tracking requests (``pre-dump`` and ``dump`` with ``--track-mem``, over RPC or on
the command line) with wpdump's tracker and hands everything else to a real CRIU 4.x (realcriu.py):
rpc.py serves ``criu swrk FD``, cmdline.py the command line.
"""
