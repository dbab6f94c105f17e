"""`python -m m4_cudagraph [--model DIR] [options] "prompt" ...`"""

from m1_sampling.cli import main
from m4_cudagraph.llm import LLM

if __name__ == "__main__":
    main(LLM, "m4_cudagraph")
