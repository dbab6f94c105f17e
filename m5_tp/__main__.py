"""`python -m m5_tp [--model DIR] [--tensor-parallel-size N] [options] "prompt" ...`

Also under torchrun: `torchrun --standalone --nproc-per-node N -m m5_tp --tensor-parallel-size N ...`
(rank 0 prints the outputs)."""

from m1_sampling.cli import main
from m5_tp.llm import LLM

if __name__ == "__main__":
    main(LLM, "m5_tp")
