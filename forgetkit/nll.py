"""``python -m forgetkit.nll``: NLL of SFT and MixSD targets under a base model.

The library lives in :mod:`forgetkit.diagnostics.nll`; this is its command line.
"""

from forgetkit.diagnostics.nll import main

if __name__ == "__main__":
    main()
