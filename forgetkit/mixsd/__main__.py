"""``python -m forgetkit.mixsd``: build MixSD targets into a resumable JSONL file."""

from forgetkit.mixsd.targets import main

if __name__ == "__main__":
    main()
