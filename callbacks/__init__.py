"""Lightning callbacks, one per axis of cheaper fine-tuning (``lightning_3d.callbacks``).

Each callback is thin glue: it decides *when* (which hook, which step) and calls the algorithms in
:mod:`lightning_3d` for *what*. The axes land here as they are built.
"""

__all__: list[str] = []
