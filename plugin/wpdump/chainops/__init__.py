"""Operations on written chains: show, check the structure offline (check.py), compare with a live process
(verify.py), squash into one level, punch superseded pages out (dedup.py), and roll a live process's memory
back to a checkpoint in place (rollback.py)."""
