"""`python -m m2_kvcache [--model DIR] [options] "prompt" ...`"""

from m1_sampling.cli import main
from m2_kvcache.llm import LLM

if __name__ == "__main__":
    main(LLM, "m2_kvcache")
