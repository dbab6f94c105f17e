"""`python -m m1_sampling [--model DIR] [options] "prompt" ...`"""

from m1_sampling.cli import main
from m1_sampling.llm import LLM

if __name__ == "__main__":
    main(LLM, "m1_sampling")
