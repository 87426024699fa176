"""Tests of lightning_txopt."""

import atexit


def _destroy_process_group() -> None:
    """Destroy a torch.distributed process group left at interpreter exit (``ddp_spawn`` children).

    Lightning does not destroy it; on CPU, gloo's threads were then torn down by static destructors after Python's
    shutdown, which now and then aborted a finished child ("terminate called without an active exception", SIGABRT)
    and failed a passing 2-process test. Every spawned child imports this package to unpickle its test objects.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_destroy_process_group)
