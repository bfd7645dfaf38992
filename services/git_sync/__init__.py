"""git-sync: keeps the desktop's checkout current (fetch + fast-forward only) and reports how."""
