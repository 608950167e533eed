"""From stored rows to laws.json and back: fit every group, the file, forecasts from it.

Imports the estimators only; the studies are added by laws/fit.py.
"""
