"""The paper's evaluation protocol (``regmis benchmark``): cases, datasets, elastix settings, the study, its report.

Separate from the product's path (io -> preprocess -> networks -> inference -> landmarks / metrics /
evaluation): the study uses the product's ``predict`` and metrics like any caller would.
"""
