"""fedsim: federated-learning experiments on top of fedkernels (the repository's main job).

    python -m fedsim            # the full run: 4 configurations x 3 seeds
    python -m fedsim --quick    # seconds, for smoke tests
    python -m fedsim --help     # every setting, its meaning and default

FedAvg with server momentum over many non-IID clients, every upload compressed by
`fedkernels.compressor` (with `fedkernels.residual_store` for error feedback). It uses only
fedkernels' public API and lives outside the library, so `import fedkernels` never pulls in
argparse, scikit-learn or matplotlib. Needs the `sim` extra (scikit-learn for the digits data,
matplotlib for the plots); `--data synthetic` runs without scikit-learn.
"""
