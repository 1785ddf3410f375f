"""The target layer: every kernel operation on the target process and every read of it. The native helper (one
way in: native.py, raising typed errors), /proc (process.py: one open_proc with one error mapping; fds,
io_uring, VMAs), userfaultfd and PAGEMAP_SCAN (uffd.py), the ptrace agent that seizes, freezes and injects
syscalls (agent, ptrace, inject, freeze), and reading the target's memory without changing it (memory.py)."""
