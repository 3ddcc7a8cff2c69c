"""``python -m forgetkit.train``: fine-tune a model with SFT, MixSD, OPSD, EWC, replay or Fisher-orthogonal SFT."""

from forgetkit.train.run import main

if __name__ == "__main__":
    main()
