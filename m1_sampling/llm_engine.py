"""The engine loop: schedule -> run the model -> sample -> append, detokenize, check stops.

Later milestones keep this loop and swap its parts: `scheduler_cls` and `model_runner_cls` are the
extension points (m2: continuous batching over a KV cache; m3: paged blocks; m4: CUDA graphs).
"""

from __future__ import annotations

import itertools

import torch

from m0_config.config import EngineConfig
from m0_config.loader import check_vocab, get_eos_token_ids, load_tokenizer
from m0_config.outputs import CompletionOutput, Logprob, RequestOutput
from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Request, Sequence, SequenceStatus
from m1_sampling.detokenizer import Detokenizer
from m1_sampling.model_runner import ModelRunner
from m1_sampling.sampler import Sampler, SamplerOutput
from m1_sampling.sampling_metadata import SamplingMetadata, host_to_device
from m1_sampling.scheduler import Scheduler, SchedulerOutput
from m1_sampling.stop_checker import StopChecker


def make_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of candidate `index` of a seeded request. Candidate 0 uses the seed itself;
    the others mix the index in, so the n samples differ but are each reproducible."""
    derived = seed if index == 0 else (seed * 0x9E3779B1 + index * 0x85EBCA77) % (2**63)
    return torch.Generator(device=device).manual_seed(derived)


def needs_text_each_step(sp: SamplingParams) -> bool:
    """Stop strings are searched in the text, and logprobs carry each candidate's text."""
    return bool(sp.stop) or sp.logprobs is not None


class LLMEngine:
    scheduler_cls = Scheduler
    model_runner_cls = ModelRunner

    def __init__(self, config: EngineConfig):
        self.config = config
        mc = config.model_config
        torch.manual_seed(mc.seed)  # unseeded requests draw from the global generator, as in vLLM
        self.tokenizer = load_tokenizer(mc.tokenizer)
        check_vocab(self.tokenizer, mc.hf_config)
        self.eos_token_ids = get_eos_token_ids(self.tokenizer, mc.model)
        self.model_runner = self.model_runner_cls(config)
        self.scheduler = self.make_scheduler()
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self.stop_checker = StopChecker(mc.max_model_len, self.eos_token_ids)
        self.seq_counter = itertools.count()
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> generator of a seeded request

    def make_scheduler(self):
        """Extension point: m3's scheduler also needs the number of blocks the runner allocated."""
        return self.scheduler_cls(self.config)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ):
        """Create the request's best_of sequences (forks of the first) and queue it."""
        first = Sequence(next(self.seq_counter), prompt, prompt_token_ids)
        seqs = [first] + [first.fork(next(self.seq_counter)) for _ in range(params.best_of - 1)]
        if params.seed is not None:
            for i, seq in enumerate(seqs):
                self.generators[seq.seq_id] = make_generator(params.seed, i, self.config.model_config.device)
        self.scheduler.add_request(Request(request_id, seqs, params))

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort these requests and drop them and their generators: nothing of them remains."""
        for request_id in request_ids:
            self.scheduler.abort_request(request_id)
        for req in self.scheduler.pop_finished_requests():
            for seq in req.seqs:
                self.generators.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of the requests that finished in it."""
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.is_empty:
            logits = self.model_runner.execute_model(scheduler_output)  # (num_scheduled, vocab)
            self._sample_and_append(scheduler_output, logits)
        self.scheduler.update_from_output(scheduler_output)
        return [self._make_output(req) for req in self.scheduler.pop_finished_requests()]

    def _sample_and_append(self, scheduler_output: SchedulerOutput, logits: torch.Tensor) -> None:
        sampled = self._sample(scheduler_output, logits)
        if sampled is not None:
            self._append_tokens(*sampled)

    def _sample(
        self, scheduler_output: SchedulerOutput, logits: torch.Tensor
    ) -> tuple[list[Sequence], list[SamplingParams], SamplerOutput] | None:
        """Sample the rows that keep their token: (their sequences, their params, the sampler's output
        on the device), or None when no row samples. Launches GPU work and does not wait for it."""
        seqs, params = scheduler_output.seqs, scheduler_output.sampling_params
        if not all(scheduler_output.samples):  # a non-final prefill chunk samples nothing
            rows = [i for i, keep in enumerate(scheduler_output.samples) if keep]
            if not rows:
                return None
            seqs, params = [seqs[i] for i in rows], [params[i] for i in rows]
            logits = logits[host_to_device(rows, torch.int64, logits.device)]
        generators = self.generators  # only seeded requests have one
        metadata = SamplingMetadata.from_sequences(
            seqs,
            params,
            [generators.get(s.seq_id) for s in seqs] if generators else [None] * len(seqs),
            self.eos_token_ids,
            self.model_runner.vocab_size,
            logits.device,
        )
        return seqs, params, self.sampler(logits, metadata)

    def _append_tokens(self, seqs: list[Sequence], params: list[SamplingParams], out: SamplerOutput) -> None:
        # Each .tolist() is a device-to-host copy and a wait for the GPU: two per step, more only
        # when a row asked for logprobs.
        token_ids, logprobs = out.sampled_token_ids.tolist(), out.logprobs.tolist()
        if out.ranks is None:  # no row asked for logprobs
            entries = [None] * len(seqs)
        else:
            entries = self._logprob_entries(params, token_ids, logprobs, out)
        for seq, sp, token_id, logprob, entry in zip(seqs, params, token_ids, logprobs, entries):
            seq.append_token_id(token_id, logprob, entry)
            # Text is needed during generation only to find stop strings or name logprob tokens;
            # otherwise it is decoded once when the request finishes (see _completion).
            new_chars = self.detokenizer.decode_sequence_inplace(seq, sp) if needs_text_each_step(sp) else 0
            self.stop_checker.maybe_stop_sequence(seq, new_chars, sp)

    @staticmethod
    def _logprob_entries(
        params: list[SamplingParams], token_ids: list[int], logprobs: list[float], out: SamplerOutput
    ) -> list[dict[int, Logprob] | None]:
        """Row i's {token_id: Logprob} for its top `logprobs` tokens and the chosen one, or None
        when the row did not ask for logprobs."""
        ranks = out.ranks.tolist()
        no_topk = [[] for _ in params]
        topk_ids = out.topk_token_ids.tolist() if out.topk_token_ids is not None else no_topk
        topk_lps = out.topk_logprobs.tolist() if out.topk_logprobs is not None else no_topk
        entries = []
        for i, sp in enumerate(params):
            entry = None
            if sp.logprobs is not None:
                top = zip(topk_ids[i][: sp.logprobs], topk_lps[i][: sp.logprobs])
                entry = {tok: Logprob(lp, rank=r + 1) for r, (tok, lp) in enumerate(top)}
                entry[token_ids[i]] = Logprob(logprobs[i], rank=ranks[i])
            entries.append(entry)
        return entries

    # ---- outputs -------------------------------------------------------------------------------
    def _make_output(self, req: Request) -> RequestOutput:
        """best_of > n: the n candidates with the highest cumulative logprob; else all n in order."""
        sp = req.sampling_params
        seqs = req.get_seqs()
        if sp.best_of > sp.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        outputs = [self._completion(i, seq, sp) for i, seq in enumerate(seqs[: sp.n])]
        for seq in req.seqs:
            self.generators.pop(seq.seq_id, None)
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outputs, finished=True)

    def _completion(self, index: int, seq: Sequence, sp: SamplingParams) -> CompletionOutput:
        text = seq.output_text
        if not needs_text_each_step(sp):
            # A stop token's text is left out, as the stop checker does during incremental decoding.
            stopped_on_token = seq.status == SequenceStatus.FINISHED_STOPPED and not isinstance(
                seq.stop_reason, str
            )
            text = self.detokenizer.decode_all(
                seq, sp, drop_last=stopped_on_token and not sp.include_stop_str_in_output
            )
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(seq.data.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.output_logprobs if sp.logprobs is not None else None,
            finish_reason=SequenceStatus.get_finished_reason(seq.status),
            stop_reason=seq.stop_reason,
        )
