"""``python -m forgetkit.train``: fine-tune a model with SFT, MixSD or OPSD."""

from forgetkit.train.run import main

if __name__ == "__main__":
    main()
