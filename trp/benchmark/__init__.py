"""The benchmark suite behind ``python -m trp bench`` and ``pytest benches/``.

``cases`` lists what is measured, ``providers`` how each implementation is prepared (each
able to say why it cannot run a case), ``runner`` times them side by side and checks every
output against the dense reference first, ``report`` renders tables and plots.
"""
