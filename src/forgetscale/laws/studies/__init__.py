"""What is computed from fitted laws and published ones: laws across methods, mitigation arms at
matched loss, the paper's constants, simulated sweeps. May import the estimators and the pipeline."""
