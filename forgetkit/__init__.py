"""forgetkit: measure and explain what a knowledge-injection fine-tune costs a language model."""

__version__ = "0.1.0"
