"""Stands in for SimpleITK on a lent GPU machine, whose image has none (README, "On a lent GPU").

The trainer's modules import SimpleITK at the top, but a GPU stretch (``benchmarks.gpu_session``) calls it
nowhere: it reads the compact NumPy cache (``trainer.cache``), makes no phantoms and registers nothing. This
module lets those imports pass, and fails loudly, naming the function, the moment anything calls SimpleITK,
so a stretch can never run on a silently missing step. ``gpu_session`` puts it on the path only where the
real SimpleITK is absent (or with ``--without-simpleitk``, to rehearse the GPU machine on the CPU).
"""


class _Absent(type):
    """``SimpleITK.<name>`` is a class of this kind: a constant at a module's top level and a class in
    ``isinstance`` (nothing is an instance of it) pass; calling it fails."""

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"SimpleITK.{cls.__name__} was called, but SimpleITK is not installed on this machine: "
                           "the GPU stretch must not need it (benchmarks/gpu_session.py)")


def __getattr__(name: str) -> _Absent:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Absent(name, (), {"__module__": __name__})
