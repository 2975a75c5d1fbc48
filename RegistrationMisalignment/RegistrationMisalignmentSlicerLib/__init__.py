"""The Slicer side of RegistrationMisalignment: MRML <-> SimpleITK, display, dependencies, jobs.

These helpers need ``slicer``/``vtk`` and so cannot live in ``RegistrationMisalignmentLib``, which
must stay importable without Slicer. They sit in a package (not as loose ``.py`` files beside the
module) because Slicer tries to load every ``.py`` file in a module folder as a module of its own.
"""
