"""`python -m m3_paged [--model DIR] [options] "prompt" ...`"""

from m1_sampling.cli import main
from m3_paged.llm import LLM

if __name__ == "__main__":
    main(LLM, "m3_paged")
