"""Remote-sensing datasets: catalogue, splits and the Dassl dataset classes.

Importing this package imports nothing heavy; ``datasets.remote_sensing`` (the only module that imports
Dassl) registers the Dassl dataset classes when it is imported.
"""
