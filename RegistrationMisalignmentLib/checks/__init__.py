"""Registration checks beside the learned map: the classical maps registration users already trust.

Every check gives one (or two) maps on the fixed image's exact grid, LPS mm, so that all of them can be
shown side by side and summarised over the same region:

``confidence``           confidence (maximum class probability) and entropy (bits) of the learned map
``jacobian``             Jacobian determinant of the registration transform, folding (det <= 0) counted
``inverse_consistency``  |T_back(T_forward(x)) - x| in mm, when both directions were registered
``intensity``            |F - D| in HU, the fixed image against the registered moving image
``reregistration``       "elastix-t": elastix B-spline re-registers F and D; the residual |u| in mm and its
                         3 / 6 mm classes (optional extra: itk-elastix)
``summary``              share per class, folding share, mean / p95 of the continuous maps, inside a region,
                         and every map's value at landmarks
``run``                  computes any set of them in one call (the CLI's ``regmis qa`` and the Slicer Logic)

``maps`` names each map, its unit, display range and colours, for the CLI, the figures and Slicer alike.
``fields`` samples any transform on the fixed grid, slab by slab; ``reporting`` is progress and cancel;
``elastix_worker`` is the re-registration's child process; ``command`` is ``regmis qa``. Nothing here imports
Slicer, Qt or VTK; torch only where the learned map runs.
"""
