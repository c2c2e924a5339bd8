"""The test process's memory: the server tests run the server in-process, so this is the server's (and
its clients')."""


def rss_mb() -> float:
    """Resident set size of this process in MiB (0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
