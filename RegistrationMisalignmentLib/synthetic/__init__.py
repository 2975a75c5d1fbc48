"""Known deformations of CT: the procedural phantom, the synthetic DVFs and the deformed pairs.

What training, the demo and the benchmark all need to make a pair whose true misalignment is known:
``phantom`` (a chest CT phantom for machines without data), ``images`` (a CT on the 1 mm grid),
``dvf`` (the four DVF families of the method) and ``deform`` (warp + sponge model + noise); and for the
real-CT benchmark ``breathing`` (a physiological breathing field that slides at the lung surface).
"""
