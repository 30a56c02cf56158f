"""An lm-evaluation-harness LM over bloomrun's own model, loaded from a checkpoint.

Why not lm-eval's HFLM on `bloomctl export`: the export (and transformers' BLOOM) can only
represent ALiBi + embedding LayerNorm + GELU, while the paper's ablation arms also need
rotary, learned and no positions, no embedding LayerNorm and SwiGLU. This adapter runs the
`Bloom` module the trainer trained, so every arm is scored by the same code.

It subclasses lm-eval's `TemplateLM`, so the context/continuation split, the empty-context
prefix token and the rolling windows are lm-eval's own, and a request's tokens are the ones
HFLM would score (tests/eval/test_adapter.py checks each log-likelihood against HFLM to 1e-4).
What it does differently, for speed: requests are sorted by length (longest first, as HFLM
does) and batched with right padding, and the LM head runs only at the continuation's
positions, not at every position of the padded batch: at BLOOM's 250,880-token vocabulary
that (B, T, V) product and its log-softmax are most of a short request's cost
(bench/eval_throughput.py, BENCHMARKS.md).

Precision: fp32 weights; on a GPU the forward runs under bf16 autocast (as the trainer's
steps do) with the Triton kernels, on the CPU in fp32. Log-softmax is always fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from tqdm import tqdm

from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import Bloom, ModelArgs, ops

BOS, EOS = "<s>", "</s>"  # BLOOM's special tokens (bloomrun.cli.export.SPECIAL_TOKENS)
DEFAULT_MAX_GEN_TOKS = 256

# One scored request: (index in the caller's list, tokens fed, continuation tokens).
Scored = tuple[int, list[int], list[int]]


def load_model(step_dir: Path, model_cfg: ModelConfig, device: torch.device | str = "cpu") -> Bloom:
    """The checkpoint's weights in a model of `model_cfg`'s shape, in eval mode on `device`,
    with the kernels `model.kernels` picks there. CheckpointError for a file that is
    unreadable; ValueError (naming tensors) for weights of another shape."""
    weights = ckpt.read_tensors(step_dir, "model.safetensors")
    with torch.device("meta"):  # no memory and no random init: every tensor comes from the file
        model = Bloom(ModelArgs.from_config(model_cfg))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    mismatched = [n for n in set(expected) & set(weights) if expected[n].shape != weights[n].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{step_dir}: weights do not fit model config (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, other shape {sorted(mismatched)[:4]})")
    model.load_state_dict({n: t.float() for n, t in weights.items()}, strict=True, assign=True)
    return model.to(device).eval().use_kernels(ops.resolve(model_cfg.kernels, device))


class BloomLM(TemplateLM):
    """lm-eval's LM interface over a `Bloom` and its tokenizers JSON file."""

    def __init__(self, model: Bloom, tokenizer: Tokenizer | str | Path, *, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        self.batch_size = batch_size
        self.max_length = max_length or model.args.seq_length
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device
        eos = self.tokenizer.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"the tokenizer has no {EOS} token (lm-eval needs an end-of-text token)")
        self._eot = eos
        bos = self.tokenizer.token_to_id(BOS)
        self._prefix = eos if bos is None else bos  # HFLM's rule: BOS if there is one, else EOS

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Our tokenizers have no post-processor: no special token is ever added.
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    # ----------------------------------------------------------------- scoring

    def _autocast(self):
        # bf16 on a GPU (the trainer's precision there), plain fp32 on the CPU.
        return torch.autocast("cuda", torch.bfloat16, enabled=self._device.type == "cuda")

    @torch.no_grad()
    def _score_batch(self, batch: list[Scored]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation) and whether it is the greedy continuation, per request."""
        longest = max(len(tokens) for _, tokens, _ in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)  # right padding: causal, so harmless
        rows, cols, targets = [], [], []
        for row, (_, tokens, continuation) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            # The logits at position t predict token t + 1: the continuation's tokens are
            # predicted by the last len(continuation) positions of what is fed.
            start = len(tokens) - len(continuation)
            rows += [row] * len(continuation)
            cols += range(start, len(tokens))
            targets += continuation
        with self._autocast():
            hidden = self.model.hidden_states(ids.to(self._device))  # (B, T, C)
            picked = hidden[torch.tensor(rows, device=self._device), torch.tensor(cols, device=self._device)]  # (N, C)
            logits = F.linear(picked, self.model.word_embeddings.weight)  # (N, V): only where scored
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(targets, device=self._device)
        chosen = logprobs.gather(1, target[:, None])[:, 0].cpu()
        greedy = (logprobs.argmax(dim=-1) == target).cpu()
        results, offset = [], 0
        for _, _, continuation in batch:
            n = len(continuation)
            results.append((float(chosen[offset: offset + n].double().sum()), bool(greedy[offset: offset + n].all())))
            offset += n
        return results

    def _score(self, scored: list[Scored], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Score requests longest first in batches; results in the caller's order."""
        order = sorted(scored, key=lambda r: (-len(r[1]), r[1]))
        results: list[tuple[float, bool] | None] = [None] * len(scored)
        with tqdm(total=len(order), desc=desc, disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start: start + self.batch_size]
                for (index, _, _), result in zip(batch, self._score_batch(batch)):
                    results[index] = result
                bar.update(len(batch))
        return results

    def _feed(self, context: list[int], continuation: list[int]) -> list[int]:
        """What the model reads for one request: context + continuation less its last token,
        left-truncated to max_length (HFLM's rule)."""
        assert context and continuation, "lm-eval gives a non-empty context and continuation"
        return (context + continuation)[-(self.max_length + 1):][:-1]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = [(i, self._feed(context, continuation), continuation)
                  for i, (_, context, continuation) in enumerate(requests)]
        return self._score(scored, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Every token of each string scored once, in windows of max_length (lm-eval's own
        window rule, as HFLM); the windows of all strings are batched together."""
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((len(windows), self._feed(context, continuation), continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, the end-of-text token or max_gen_toks.

        Requests are sorted by prompt length and batched among prompts of equal length and
        settings, which need no padding (the model takes no attention mask)."""
        prompts = []
        for index, req in enumerate(requests):
            context, settings = req.args
            settings = dict(settings or {})
            until = settings.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
            prompts.append((index, ids, tuple(until), max_new))
        prompts.sort(key=lambda p: (-len(p[1]), p[2], p[3]))
        outputs: list[str | None] = [None] * len(requests)
        with tqdm(total=len(prompts), desc="generate_until", disable=disable_tqdm) as bar:
            start = 0
            while start < len(prompts):
                key = (len(prompts[start][1]), prompts[start][2], prompts[start][3])
                end = start
                while (end < len(prompts) and end - start < self.batch_size
                       and (len(prompts[end][1]), prompts[end][2], prompts[end][3]) == key):
                    end += 1
                batch = prompts[start:end]
                for (index, _, _, _), text in zip(batch, self._generate([p[1] for p in batch], *key[1:])):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                bar.update(len(batch))
                start = end
        return outputs

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], until: tuple[str, ...], max_new: int) -> list[str]:
        """Greedy continuations of equal-length prompts, each cut at its first stop string."""
        ids = torch.tensor(prompts, device=self._device)  # (B, T)
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new):
            window = ids[:, -self.max_length:]
            with self._autocast():
                last = self.model.hidden_states(window)[:, -1]  # (B, C)
                logits = F.linear(last, self.model.word_embeddings.weight)  # (B, V)
            token = logits.float().argmax(dim=-1)  # (B,)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(t)
                if any(stop in self.tok_decode(new[row]) for stop in until):
                    done[row] = True
            if all(done):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
        texts = []
        for tokens in new:
            text = self.tok_decode(tokens)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts
