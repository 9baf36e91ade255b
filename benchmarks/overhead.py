"""Cost of the exact KL modes: time and memory of one loss + backward step, patched versus unpatched, side by side.

Shapes: batch 32 (4 groups of 8), response length 512..4096 (each response's length uniform in [T/2, T]),
float32. Two sources of log-probs:

* ``tensors``: precomputed (B, T) log-prob tensors (a leaf with requires_grad): the KL term alone, the worst case
  for a relative overhead because nothing else is computed;
* ``lm-head``: log-probs from a small LM head forward (hidden states (B, T, 64) -> vocabulary 1024 ->
  log_softmax -> gather), gradients to the head and the hidden states: the realistic case, where the overhead
  relative to the whole step is what matters.

Each step is a token-mean policy-gradient loss (ratio x advantage) plus the KL: ``unpatched`` = beta * k3 in the
loss written as the libraries write it (TRL's and verl's ``low_var_kl`` line: exp(r) - r - 1 with r = ref - logp,
verl's clamp to [-10, 10]; not the core's ``estimators.k3``, which validates and masks and so costs more);
``unpatched (A/A control)`` = the very same step in a second slot, whose ratio band is the noise floor;
``k1-rtg-loss`` = ``kl_patches.kl_rtg_loss`` with per-decision weights, normalised by the batch's token count;
``k1-in-reward`` = ``kl_patches.kl_advantage`` folded into the advantage (no KL term in the loss); ``no KL``, a
lower bound. Each repetition runs every variant once in a fresh random order; a timing value is the mean of as
many back-to-back calls as last >= 20 ms (sub-millisecond KL-only steps are otherwise timer noise). The CSV holds
the median / p20 / p80 time and per-repetition ratio to ``unpatched``; a target counts as "met" only when the p80
of the ratio is within it, "within noise" when the p20-p80 band straddles it (TRL: the 90 % CI of the median
ratio, see below). ``--lengths`` sets the response lengths.

Memory, two CPU measures (tracemalloc does not see torch's allocator): ``saved_bytes`` = bytes of the unique
storages the autograd graph saves for backward (``torch.autograd.graph.saved_tensors_hooks``), and ``peak_rss`` =
the step's peak resident-set increase in a fresh subprocess (Linux VmHWM after resetting it through
/proc/self/clear_refs, minus the RSS before the step; LM-head source only), each with its absolute delta to
``unpatched`` (``*_delta``) beside the ratio. Where CUDA exists the core measurement also runs on the GPU
(``overhead-gpu-*``: device synchronised around each timed block, ``cuda_peak_bytes`` from torch.cuda memory
stats); where it does not, the script says it skipped it.

Libraries (verl, OpenRLHF, whose loss code takes log-prob tensors): their real loss functions through the adapters'
helpers (``_libraries``), the library's default KL (unpatched, in two slots: the second is the A/A control) against
the kl-patches mode that replaces it, loss side and reward side, in a fresh random order per repetition, each in the
patch state it needs; memory = saved bytes only. An LM-head point repeats until its verdict is decided (or 120 s). The OpenRLHF harness (the adapter's audit helpers) wraps tensors in
a float64-preserving subclass whose per-op dispatch cost both sides pay. TRL: its own ``GRPOTrainer`` (twice: A/A
control) against kl-patches' drop-in subclass in each mode, on a small Llama with generation replaced by a fixed
batch of completions, on-policy with TRL's defaults, response lengths 128/512/2048 and batches 8/64 (``--lengths``,
``--batches``): scoring (``_generate_and_score_completions``) and ``compute_loss`` + backward, timed separately and
together; memory = saved bytes of the loss and the peak RSS of a whole step in a fresh subprocess (``--probe-trl``).
A TRL point repeats until every mode's verdict is decided (the 90 % CI of its median step ratio lies wholly within
or wholly above 1.03) or its time budget (``--budget``, seconds per point) runs out, then says "within noise";
Python's garbage collector runs between timed steps, not inside them, in every slot alike.

Also recorded: the wall time of ``kl-patches check --library <lib>`` in a fresh process (library import included)
for core and every installed library.

    python benchmarks/overhead.py            # core + every library installed in this interpreter
    python benchmarks/overhead.py --quick    # short responses, two repetitions (smoke test)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "overhead"
BATCH, GROUP, BETA = 32, 8, 0.04
HIDDEN, VOCAB = 64, 1024
#: "unpatched" is k3 written as the libraries write it (TRL's and verl's low_var_kl line: exp(r) - r - 1 on
#: r = ref - logp, verl's clamp), not the core's ``estimators.k3`` (which costs more: input checks, masking);
#: "unpatched (A/A control)" is the very same step in a second slot: its ratio band is the noise floor;
#: "no KL" bounds from below what the KL costs at all.
CORE_VARIANTS = ("unpatched", "unpatched (A/A control)", "k1-rtg-loss", "k1-in-reward", "no KL")
CONTROL = "unpatched (A/A control)"
#: a timing sample is the mean of enough back-to-back calls to last at least this long (short KL-only steps)
MIN_SAMPLE_S = 0.02
TARGET_TIME, TARGET_MEMORY = 1.03, 1.01
#: one intra-op thread: on a shared machine a second thread turns every op into a wait for a descheduled worker
THREADS = 1
#: interleaved repetitions per source: sub-millisecond KL-only steps need many to beat a shared machine's jitter
REPETITIONS = {"tensors": 41, "lm-head": 15}
LIBRARY_REPETITIONS = {"tensors": 41, "lm-head": 15}
#: seconds per verl / OpenRLHF LM-head point before an undecided verdict stops as "within noise"
LIBRARY_BUDGET_S = 120.0


def make_inputs(source: str, length: int, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (BATCH,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -2.0 * torch.rand(BATCH, length, generator=generator)
    inputs = {
        "mask": mask,
        "old": old,
        "ref": old + 0.1 * torch.randn(BATCH, length, generator=generator),
        "advantages": torch.randn(BATCH, generator=generator),
        "group_ids": torch.arange(BATCH // GROUP).repeat_interleave(GROUP),
        "num_tokens": float(mask.sum()),
        "source": source,
    }
    if source == "tensors":
        inputs["logp"] = (old + 0.05 * torch.randn(BATCH, length, generator=generator)).requires_grad_()
    else:
        inputs["hidden"] = torch.randn(BATCH, length, HIDDEN, generator=generator).requires_grad_()
        inputs["head"] = (torch.randn(HIDDEN, VOCAB, generator=generator) / HIDDEN ** 0.5).requires_grad_()
        inputs["tokens"] = torch.randint(0, VOCAB, (BATCH, length), generator=generator)
    return inputs


def log_probs(inputs: dict):
    import torch

    if inputs["source"] == "tensors":
        return inputs["logp"]
    logits = inputs["hidden"] @ inputs["head"]
    return torch.log_softmax(logits, dim=-1).gather(-1, inputs["tokens"].unsqueeze(-1)).squeeze(-1)


def policy_loss(logp, inputs: dict, advantages):
    import torch

    ratio = torch.exp(logp - inputs["old"])
    per_token = torch.where(inputs["mask"], -ratio * advantages[:, None], 0.0)
    return per_token.sum() / inputs["num_tokens"]


def core_step(variant: str):
    import torch

    from kl_patches import estimators, terms

    def step(inputs: dict) -> None:
        logp = log_probs(inputs)
        if variant in ("unpatched", CONTROL):
            log_ratio = inputs["ref"] - logp  # TRL / verl low_var_kl: exp(r) - r - 1, clamped as verl does
            per_token = torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10, max=10)
            kl = torch.where(inputs["mask"], per_token, 0.0).sum() / inputs["num_tokens"]
            loss = policy_loss(logp, inputs, inputs["advantages"]) + BETA * kl
        elif variant == "k1-rtg-loss":
            loss = policy_loss(logp, inputs, inputs["advantages"]) + terms.kl_rtg_loss(
                logp, inputs["ref"], inputs["mask"], beta=BETA, behaviour_logp=inputs["old"],
                group_ids=inputs["group_ids"], normalizer=inputs["num_tokens"])
        elif variant == "k1-in-reward":
            # computed once per generation batch from the rollout log-probs, then optimised by the same PG loss
            advantages = inputs["advantages"] + terms.kl_advantage(
                inputs["old"], inputs["ref"], inputs["mask"], beta=BETA, group_ids=inputs["group_ids"])
            loss = policy_loss(logp, inputs, advantages)
        elif variant == "no KL":
            loss = policy_loss(logp, inputs, inputs["advantages"])
        else:
            raise ValueError(variant)
        loss.backward()

    del estimators
    return step


def clear_grads(inputs: dict) -> None:
    for key in ("logp", "hidden", "head"):
        if key in inputs:
            inputs[key].grad = None


def synchronise(inputs: dict) -> None:
    import torch

    if inputs.get("device", "cpu") != "cpu":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, inputs: dict, repetitions: int, min_sample: float = MIN_SAMPLE_S,
                     seed: int = 0) -> dict:
    """{variant: [seconds per call, one value per repetition]}. Each repetition runs every variant once, in a fresh
    random order (no variant always first or last); a value is the mean of ``calls`` back-to-back calls, with
    ``calls`` chosen so that a value lasts at least ``min_sample`` (sub-millisecond steps are otherwise noise).
    On a GPU the device is synchronised before and after each timed block."""
    import random

    names = list(steps)
    order = random.Random(seed)
    for name in names:  # warm-up
        steps[name](inputs)
        clear_grads(inputs)
    synchronise(inputs)
    started = time.perf_counter()
    steps[names[0]](inputs)
    clear_grads(inputs)
    synchronise(inputs)
    calls = max(1, int(min_sample / max(time.perf_counter() - started, 1e-6)))
    times = {name: [] for name in names}
    for _ in range(repetitions):
        for name in order.sample(names, len(names)):
            synchronise(inputs)
            started = time.perf_counter()
            for _ in range(calls):
                steps[name](inputs)
                clear_grads(inputs)
            synchronise(inputs)
            times[name].append((time.perf_counter() - started) / calls)
    return times


def median_ci(values: list[float], level: float = 0.9, resamples: int = 4000, seed: int = 0,
              blocks: list[int] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median: unlike the p20-p80 band of single repetitions (the
    spread of one measurement, which more repetitions do not narrow), it shrinks as repetitions accumulate, so it
    is what resolves a 3 % target. ``blocks`` (sizes of consecutive runs of ``values`` measured on the same
    instances) resamples whole blocks: an instance's own offset (its memory layout) then counts as noise, not as
    signal, and the interval stays honest however many repetitions one block holds."""
    import random

    if len(values) < 3:
        return min(values), max(values)
    draw = random.Random(seed)
    if blocks and len(blocks) > 1:
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        groups = [values[start:start + size] for start, size in zip(starts, blocks)]
        medians = sorted(statistics.median([v for group in draw.choices(groups, k=len(groups)) for v in group])
                         for _ in range(resamples))
    else:
        medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int((1 - level) / 2 * resamples)], medians[int((1 + level) / 2 * resamples) - 1]


def add_ratio_rows(rows: _common.Rows, ratios: list[float], blocks: list[int] | None = None, **common) -> None:
    """The per-repetition ratios (median, p20, p80) and, as metric ``time_ratio_ci90``, the median with the 90 %
    bootstrap confidence interval of the median in the p20 / p80 columns."""
    rows.add(metric="time_ratio_vs_unpatched", unit="ratio", values=ratios, **common)
    low, high = median_ci(ratios, blocks=blocks)
    rows.add(metric="time_ratio_ci90", unit="ratio (p20/p80 columns: 90 % CI of the median)",
             values=ratios, summary=(statistics.median(ratios), low, high), **common)


def repeat_until_decided(repetition, decided, minimum: int, maximum: int, budget: float) -> int:
    """Run ``repetition()`` (every slot once) ``minimum`` times, then until ``decided()`` (checked every 5) or
    ``budget`` seconds have passed or ``maximum`` is reached; the number run. Stopping when the CI excludes the
    target tests repeatedly, so the 90 % is nominal; the budget caps it, and an undecided row says so."""
    started, count = time.perf_counter(), 0
    while count < maximum:
        repetition()
        count += 1
        if count >= minimum and count % 5 == 0 and (decided() or time.perf_counter() - started > budget):
            break
    return count


def verdict(ratios: list[float], target: float, blocks: list[int] | None = None) -> str:
    """'met' when the 90 % CI of the median ratio lies within the target, 'not met' when it lies above it, else
    'within noise' (the interval straddles the target: more repetitions, or a quieter machine, would decide)."""
    low, high = median_ci(ratios, blocks=blocks)
    return "met" if high <= target else ("not met" if low > target else "within noise")


def floor_resolved(ratios: list[float], target: float, blocks: list[int] | None = None) -> bool:
    """Whether the A/A control's 90 % CI lies within [1/target, target]: the noise floor is below the effect
    sought, so a verdict at that target means something."""
    low, high = median_ci(ratios, blocks=blocks)
    return 1 / target <= low and high <= target


def saved_bytes(step, inputs: dict) -> int:
    """Bytes of the unique storages the autograd graph saves for backward during one step."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(inputs)
    clear_grads(inputs)
    return sum(storages.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_probe(source: str, variant: str, length: int) -> dict:
    """Run in a fresh subprocess: the step's peak RSS above the RSS before it (KiB)."""
    import gc

    import torch

    torch.set_num_threads(THREADS)
    step = core_step(variant)
    step(make_inputs(source, 16, seed=1))  # warm-up: one-off allocations (kernels, thread pools) happen here
    inputs = make_inputs(source, length)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
    except OSError as err:
        return {"error": f"cannot reset the RSS high-water mark: {err}"}
    before = _status_kib("VmRSS")
    step(inputs)
    return {"peak_kib": _status_kib("VmHWM") - before}


def measure_peak_rss(source: str, variant: str, length: int, repeats: int) -> list[float] | None:
    values = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, __file__, "--probe", json.dumps([source, variant, length])],
                                capture_output=True, text=True, check=True)
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        if "error" in probe:
            print(f"[{SCRIPT}] peak RSS not measured: {probe['error']}")
            return None
        values.append(probe["peak_kib"] * 1024.0)
    return values


def core_overhead(rows: _common.Rows, quick: bool, lengths=None, device: str = "cpu") -> None:
    import torch

    torch.set_num_threads(THREADS)
    lengths = lengths or ((64, 128) if quick else (512, 1024, 2048, 4096))
    steps = {variant: core_step(variant) for variant in CORE_VARIANTS}
    prefix = "overhead-" if device == "cpu" else "overhead-gpu-"
    for source in ("tensors", "lm-head"):
        repetitions = 3 if quick else REPETITIONS[source]
        for length in lengths:
            inputs = to_device(make_inputs(source, length), device)
            config = {"batch": BATCH, "group": GROUP, "source": source, "beta": BETA, "dtype": "float32",
                      "threads": torch.get_num_threads(), "repetitions": repetitions, "device": device,
                      "order": "random per repetition", "min_sample_s": 0.002 if quick else MIN_SAMPLE_S,
                      "unpatched": "k3 as TRL/verl write it: exp(r) - r - 1, r = ref - logp, clamp [-10, 10]",
                      **({"hidden": HIDDEN, "vocab": VOCAB} if source == "lm-head" else {})}
            times = time_interleaved(steps, inputs, repetitions, min_sample=config["min_sample_s"])
            what = f"{prefix}{source}"
            memory = {}
            for variant in CORE_VARIANTS:
                if device == "cpu":
                    memory[("saved_bytes", variant)] = [saved_bytes(steps[variant], inputs)]
                    # quick: one subprocess set (each imports torch, ~1 s) just to exercise the path
                    # peak RSS only where there is something to see (the LM head's logits); quick: once
                    measured = source == "lm-head" and (not quick or length == lengths[0])
                    peak = measure_peak_rss(source, variant, length, repeats=1 if quick else 3) if measured else None
                    if peak is not None:
                        memory[("peak_rss", variant)] = peak
                else:
                    memory[("cuda_peak_bytes", variant)] = [cuda_peak_bytes(steps[variant], inputs)]
            for variant, values in times.items():
                common = dict(what=what, library="core", configuration=variant, x_name="response length",
                              x=length, config=config)
                rows.add(metric="time", unit="ms", values=[1e3 * v for v in values], **common)
                ratios = [a / b for a, b in zip(values, times["unpatched"])]
                add_ratio_rows(rows, ratios, **common)
                for (metric, name), measured in memory.items():
                    if name != variant:
                        continue
                    base = memory.get((metric, "unpatched"))
                    rows.add(metric=metric, unit="bytes", values=measured, **common)
                    if base:  # absolute deltas beside the ratios: a KiB saving inside MiB of logits is invisible
                        rows.add(metric=f"{metric}_delta", unit="bytes",
                                 values=[a - statistics.median(base) for a in measured], **common)
            summary = ", ".join(f"{v} {1e3 * statistics.median(t):.2f} ms" for v, t in times.items())
            print(f"[{SCRIPT}] core {device} {source:8s} T={length:5d}: {summary}")
            del inputs


def to_device(inputs: dict, device: str) -> dict:
    if device == "cpu":
        return inputs
    moved = {}
    for key, value in inputs.items():
        if hasattr(value, "to"):
            leaf = value.is_leaf and value.requires_grad
            value = value.detach().to(device)
            if leaf:
                value.requires_grad_()
        moved[key] = value
    moved["device"] = device
    return moved


def cuda_peak_bytes(step, inputs: dict) -> int:
    """The step's peak CUDA memory above what was allocated before it (torch.cuda memory stats)."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    clear_grads(inputs)
    return peak


def gpu_overhead(rows: _common.Rows, quick: bool, lengths=None) -> bool:
    """The core measurement on the GPU when CUDA exists (synchronised timers, CUDA memory stats); says so and
    returns False when it does not."""
    import torch

    if not torch.cuda.is_available():
        print(f"[{SCRIPT}] no CUDA device here: the GPU path (synchronised timers, torch.cuda memory stats) is "
              "skipped")
        return False
    core_overhead(rows, quick, lengths=lengths, device="cuda")
    return True


def check_time(rows: _common.Rows, library: str, quick: bool) -> None:
    """Wall time of ``kl-patches check --library <library>`` in a fresh process (library import included)."""
    script = Path(sys.executable).with_name("kl-patches")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kl_patches"]
    command += ["check", "--library", library]
    values, codes = [], []
    for _ in range(1 if quick else 3):
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        values.append(time.perf_counter() - started)
        codes.append(result.returncode)
    target = 10.0 if library == "core" else 20.0
    rows.add(what="check_time", library=library, configuration=f"kl-patches check --library {library}",
             metric="time", unit="s", values=values,
             config={"target_s": target, "exit_codes": codes, "command": " ".join(command[-4:])})
    print(f"[{SCRIPT}] kl-patches check --library {library}: {statistics.median(values):.1f} s "
          f"(target < {target:g} s, exit codes {codes})")


#: (unpatched, patched) pairs of ``_libraries.loss_paths`` indices: loss side, then reward side
LIBRARY_PAIRS = {
    "verl": ((0, 3), (2, 4)),
    "openrlhf": ((0, 3), (2, 4)),
}


def library_step(loss_fn):
    """One step through a library's real loss function: the batch's log-probs (precomputed or from the LM head)
    as an AuditBatch of 4 groups of 8 sampled from a stale behaviour policy (old log-probs), then backward."""
    import torch

    from kl_patches.audit import AuditBatch

    def step(inputs: dict) -> None:
        logp = log_probs(inputs)
        batch = AuditBatch(
            tokens=torch.zeros(logp.shape, dtype=torch.long), mask=inputs["mask"], logp=logp, ref_logp=inputs["ref"],
            behaviour_logp=inputs["old"], group_ids=inputs["group_ids"], rows=torch.arange(BATCH), group_size=GROUP,
            on_policy=False,
        )
        loss_fn(batch).backward()

    return step


TRL_WORDS = 1024  # the TRL overhead model's vocabulary (w0 .. w1022, EOS)


#: TRL's variants: its own trainer twice (the second is the A/A control: its band is the noise floor) and
#: kl-patches' drop-in trainer in each mode
TRL_VARIANTS = ("unpatched", CONTROL, "k1-rtg-loss", "k1-in-reward")
#: (batch, response length) measured by default: issue 17's range, lengths 128-2048 and batches 8-64, without the
#: (64, 2048) corner, whose step takes ~2 minutes on a 2-core CPU (the KL's share of a step only shrinks there:
#: it is O(B T) next to the model's O(B T^2) attention)
TRL_GRID = ((8, 128), (8, 512), (8, 2048), (64, 128), (64, 512))
#: TRL timing in blocks, each on fresh trainers (identical trainers differ by up to ~3 % through their memory layout,
#: as large as the effect sought): a block lasts ~TRL_BLOCK_S (3..TRL_BLOCK_REPETITIONS repetitions); at least
#: TRL_MIN_BLOCKS, then until the A/A control's CI lies within +-3 % and every mode's verdict is decided, or the budget
#: (seconds per point) is spent. A step's run-to-run jitter on a shared 2-core VM is +-10-15 %.
TRL_BLOCK_S, TRL_BLOCK_REPETITIONS, TRL_MIN_BLOCKS, TRL_MAX_BLOCKS, TRL_BUDGET_S = 20.0, 25, 6, 60, 420.0
MAX_REPETITIONS = 1000


def trl_trainers(length: int, folder: str, batch: int = BATCH, names=TRL_VARIANTS):
    """TRL's own GRPOTrainer (k3 in the loss, TRL's defaults, beta = 0.04) and kl-patches' drop-in GRPOTrainer in
    each mode, on the same small Llama (float32, hidden 64, 2 layers, vocabulary 1024) saved in ``folder``, with
    generation replaced by fixed completions (lengths uniform in [T/2, T]; as kl-patches' TRL audit feeds TRL),
    so that every call of ``_generate_and_score_completions`` is TRL's scoring of the same batch."""
    import warnings

    import torch
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kl_patches.integrations import trl as adapter

    words = {f"w{i}": i for i in range(TRL_WORDS - 1)}
    words["</s>"] = TRL_WORDS - 1
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TRL_WORDS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length + 16,
                         pad_token_id=TRL_WORDS - 1, eos_token_id=TRL_WORDS - 1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    completions = [torch.randint(0, TRL_WORDS - 1, (int(n),), generator=generator).tolist() for n in lengths]
    settings = dict(output_dir=f"{folder}/out", beta=0.04, num_generations=GROUP, per_device_train_batch_size=batch,
                    max_completion_length=length, use_cpu=True, report_to=[], save_strategy="no", bf16=False)
    trainers = {}
    for name in names:
        if name in ("unpatched", CONTROL):
            config_, class_ = trl.GRPOConfig(**settings), trl.GRPOTrainer
        else:
            config_, class_ = adapter.GRPOConfig(kl_mode=name, **settings), adapter.GRPOTrainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = class_(model=folder, reward_funcs=lambda completions, **_: [0.5] * len(completions),
                             args=config_, train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * batch}),
                             processing_class=tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer._generate_single_turn = lambda prompt_ids, *args, **kwargs: ([list(c) for c in completions], None)
        trainers[name] = trainer
    return trainers


def trl_step(trainer, prompts) -> tuple[float, float]:
    """One TRL step without generation: (scoring seconds, compute_loss + backward seconds)."""
    started = time.perf_counter()
    inputs = trainer._generate_and_score_completions(prompts)
    scored = time.perf_counter()
    trainer.compute_loss(trainer.model, inputs).backward()
    done = time.perf_counter()
    trainer.model.zero_grad(set_to_none=True)
    return scored - started, done - scored


def step_work(step) -> dict:
    """The work one step does, counted, not timed (no noise): ``flops`` of its matrix products and attention
    (torch.utils.flop_counter, forward and backward), ``ops`` = aten operators dispatched and ``elements`` = tensor
    elements they wrote (the proxy for the memory-bound elementwise work a KL term adds)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = self.elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops += 1
            self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with FlopCounterMode(display=False) as flops, Counter() as counter:
        step()
    return {"flops": flops.get_total_flops(), "ops": counter.ops, "elements": counter.elements}


def trl_peak_rss_probe(variant: str, length: int, batch: int) -> dict:
    """Run in a fresh subprocess: peak RSS of one TRL step (scoring + loss + backward) above the RSS before it."""
    import gc
    import tempfile

    import torch
    import transformers

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        trainer = trl_trainers(length, folder, batch, names=(variant,))[variant]
        prompts = [{"prompt": "w1 w2"}] * batch
        trl_step(trainer, prompts)  # warm-up at the measured size: one-off allocations happen here
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError as err:
            return {"error": f"cannot reset the RSS high-water mark: {err}"}
        before = _status_kib("VmRSS")
        trl_step(trainer, prompts)
        return {"peak_kib": _status_kib("VmHWM") - before}


def step_ratios(times: dict, name: str) -> list[float]:
    """Per-repetition ratio of a TRL variant's whole step (scoring + loss) to the unpatched trainer's."""
    return [(a + b) / (c + d) for a, b, c, d in zip(times[(name, "score")], times[(name, "loss")],
                                                    times[("unpatched", "score")], times[("unpatched", "loss")])]


def trl_overhead(rows: _common.Rows, quick: bool, lengths=None, batches=None, grid=None,
                 budget: float = TRL_BUDGET_S) -> None:
    """TRL's real step, patched versus unpatched: ``_generate_and_score_completions`` (TRL's scoring of a fixed
    generation batch: rewards, advantages, reference log-probs; k1-in-reward adds one no-grad policy forward per
    generation batch for the whole-batch sequence KL, k1-rtg-loss adds nothing) and ``compute_loss`` + backward,
    on-policy (TRL's defaults: one iteration, steps_per_generation = gradient accumulation = 1), over a grid of
    response lengths and batch sizes, every variant once per repetition in a fresh random order, with TRL's own
    trainer in a second slot as the A/A control. Memory: saved-for-backward bytes of compute_loss, and the peak RSS
    of a whole step in a fresh subprocess (3 each for the unpatched trainer and each mode, at the largest length)."""
    import gc
    import random
    import tempfile

    import torch
    import transformers

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()

    if quick:
        grid = [(GROUP, 32)]
    elif grid:
        grid = list(grid)
    elif lengths or batches:
        grid = [(b, t) for b in (batches or sorted({b for b, _ in TRL_GRID}))
                for t in (lengths or sorted({t for _, t in TRL_GRID}))]
    else:
        grid = list(TRL_GRID)
    order = random.Random(0)
    for batch, length in grid:
        lengths = [t for b, t in grid if b == batch]
        prompts = [{"prompt": "w1 w2"}] * batch
        times: dict = {}
        blocks: list[int] = []
        retired: set[str] = set()
        block_count: dict[str, int] = {}

        def blocks_of(name: str) -> list[int]:
            """The blocks ``name`` ran in: all of them, or the first ones for a mode that left the rotation."""
            return blocks[:block_count[name]]

        saved, work = {}, {}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            while True:
                # a block: fresh trainers in every slot (a new memory layout each time), then interleaved steps
                # a mode whose CI already lies above the target leaves the rotation: its verdict cannot change
                # and the undecided ones get its time
                trainers = trl_trainers(length, folder, batch, names=[n for n in TRL_VARIANTS if n not in retired])
                names = list(trainers)
                for name in names:
                    trl_step(trainers[name], prompts)  # warm-up
                    for part in ("score", "loss"):
                        times.setdefault((name, part), [])
                if not blocks:  # deterministic measures, once
                    for name in names:
                        trainer = trainers[name]
                        inputs = trainer._generate_and_score_completions(prompts)
                        saved[name] = saved_bytes(lambda _: trainer.compute_loss(trainer.model, inputs).backward(), {})
                        trainer.model.zero_grad(set_to_none=True)
                        work[name] = step_work(lambda: trl_step(trainer, prompts))
                block_started, count = time.perf_counter(), 0
                while count < (1 if quick else TRL_BLOCK_REPETITIONS) and (
                        count < 3 or time.perf_counter() - block_started < TRL_BLOCK_S):
                    for name in order.sample(names, len(names)):  # a fresh random order every repetition
                        gc.collect()
                        gc.disable()  # a collection inside one slot's step would be charged to that slot only
                        try:
                            score, loss = trl_step(trainers[name], prompts)
                        finally:
                            gc.enable()
                        times[(name, "score")].append(score)
                        times[(name, "loss")].append(loss)
                    count += 1
                blocks.append(count)
                for name in names:
                    block_count[name] = len(blocks)
                del trainers
                if quick or len(blocks) >= TRL_MAX_BLOCKS:
                    break
                modes = [name for name in names if name not in ("unpatched", CONTROL)]
                verdicts = {n: verdict(step_ratios(times, n), TARGET_TIME, blocks_of(n)) for n in modes}
                if len(blocks) >= TRL_MIN_BLOCKS:
                    retired.update(n for n, v in verdicts.items() if v == "not met")
                decided = floor_resolved(step_ratios(times, CONTROL), TARGET_TIME, blocks) and all(
                    v != "within noise" for v in verdicts.values())
                if len(blocks) >= TRL_MIN_BLOCKS and (decided or time.perf_counter() - started > budget):
                    break
        repetitions = sum(blocks)
        names = list(dict.fromkeys(name for name, _ in times))  # every variant, also those that left the rotation
        peaks = {}
        if length == max(lengths) and not quick:
            for name in ("unpatched", "k1-rtg-loss", "k1-in-reward"):
                peaks[name] = measure_trl_peak_rss(name, length, batch, repeats=3)
        config = {"batch": batch, "group": GROUP, "beta": 0.04, "model": "Llama hidden 64, 2 layers, vocab 1024",
                  "dtype": "float32", "threads": torch.get_num_threads(), "repetitions": repetitions,
                  "order": "random per repetition", "regime": "on-policy (TRL defaults: no old log-probs)",
                  "blocks": blocks, "left_rotation_after_not_met": sorted(retired), "stopping": f"A/A within +-3 % and every mode decided against {TARGET_TIME} "
                  f"(90 % CI of the median, blocks resampled) or {budget:.0f} s",
                  "unpatched": "trl.GRPOTrainer (k3 in loss, TRL's defaults, beta = 0.04)"}
        suffix = f"-b{batch}"
        for name in names:
            for part, what in (("score", "overhead-trl-scoring"), ("loss", "overhead-trl-loss")):
                values = times[(name, part)]
                common = dict(what=what + suffix, library="trl", configuration=name, x_name="response length",
                              x=length, config=config)
                rows.add(metric="time", unit="ms", values=[1e3 * v for v in values], **common)
                add_ratio_rows(rows, [a / b for a, b in zip(values, times[("unpatched", part)])], blocks_of(name),
                               **common)
                if part == "loss":
                    rows.add(metric="saved_bytes", unit="bytes", values=saved[name], **common)
            total = [a + b for a, b in zip(times[(name, "score")], times[(name, "loss")])]
            base = [a + b for a, b in zip(times[("unpatched", "score")], times[("unpatched", "loss")])]
            common = dict(what="overhead-trl-step" + suffix, library="trl", configuration=name,
                          x_name="response length", x=length, config=config)
            add_ratio_rows(rows, [a / b for a, b in zip(total, base)], blocks_of(name), **common)
            rows.add(metric="time", unit="ms", values=[1e3 * v for v in total], **common)
            for metric in ("flops", "ops", "elements"):  # counted: deterministic, no noise floor
                rows.add(what="work-trl-step" + suffix, library="trl", configuration=name, metric=metric,
                         unit="count", values=work[name][metric], x_name="response length", x=length, config=config)
                rows.add(what="work-trl-step" + suffix, library="trl", configuration=name,
                         metric=f"{metric}_ratio_vs_unpatched", unit="ratio",
                         values=work[name][metric] / max(work["unpatched"][metric], 1), x_name="response length",
                         x=length, config=config)
            peak = peaks.get(name)
            if peak:
                rows.add(metric="peak_rss", unit="bytes", values=peak, **common)
                if peaks.get("unpatched"):
                    rows.add(metric="peak_rss_delta", unit="bytes",
                             values=[a - statistics.median(peaks["unpatched"]) for a in peak], **common)
        print(f"[{SCRIPT}] trl B={batch:3d} T={length:5d}: unpatched step "
              f"{1e3 * statistics.median(a + b for a, b in zip(times[('unpatched', 'score')], times[('unpatched', 'loss')])):.0f} ms, "
              f"{repetitions} repetitions in {len(blocks)} blocks; "
              + ", ".join(f"{n} {statistics.median(step_ratios(times, n)):.3f}x "
                          f"[{', '.join(f'{v:.3f}' for v in median_ci(step_ratios(times, n), blocks=blocks_of(n)))}] "
                          f"{verdict(step_ratios(times, n), TARGET_TIME, blocks_of(n))}" for n in names[1:]), flush=True)


def measure_trl_peak_rss(variant: str, length: int, batch: int, repeats: int) -> list[float] | None:
    values = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, __file__, "--probe-trl", json.dumps([variant, length, batch])],
                                capture_output=True, text=True, check=True)
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        if "error" in probe:
            print(f"[{SCRIPT}] TRL peak RSS not measured: {probe['error']}")
            return None
        values.append(probe["peak_kib"] * 1024.0)
    return values


def library_overhead(rows: _common.Rows, library: str, quick: bool, lengths=None, batches=None, grid=None,
                     budget: float = TRL_BUDGET_S) -> None:
    """Each pair (the library's default KL, the kl-patches mode replacing it) timed interleaved through the
    library's own loss code (``_libraries``), with the patch state each path needs."""
    import contextlib

    import torch

    import _libraries

    import random

    if library == "trl":
        return trl_overhead(rows, quick, lengths, batches, grid, budget)
    if library not in LIBRARY_PAIRS:
        raise LookupError(f"no overhead pairs for {library}")
    torch.set_num_threads(THREADS)
    lengths = lengths or ((64, 128) if quick else (512, 1024, 2048, 4096))
    order = random.Random(0)
    budget = min(budget, LIBRARY_BUDGET_S)
    paths = _libraries.checked_paths(library, group=GROUP)
    for unpatched_index, patched_index in LIBRARY_PAIRS[library]:
        unpatched, patched = paths[unpatched_index], paths[patched_index]
        what_suffix = "loss side" if patched.mode == "k1-rtg-loss" else "reward side"
        for source in ("tensors", "lm-head"):
            repetitions = 2 if quick else LIBRARY_REPETITIONS[source]
            for length in lengths:
                inputs = make_inputs(source, length)
                config = {"batch": BATCH, "group": GROUP, "source": source, "dtype": "float32",
                          "threads": torch.get_num_threads(), "repetitions": repetitions, "side": what_suffix,
                          "unpatched": unpatched.name, "patched": patched.name,
                          **({"hidden": HIDDEN, "vocab": VOCAB} if source == "lm-head" else {})}

                def timed(path):
                    @contextlib.contextmanager
                    def run():
                        with path.active() as loss:
                            yield library_step(loss)

                    return run

                # the two paths need different patch states: alternate them step by step, each inside its state
                # the unpatched path twice: the second slot is the A/A control whose band is the noise floor
                entries = (("unpatched", timed(unpatched)), (CONTROL, timed(unpatched)), (patched.mode, timed(patched)))
                times = {name: [] for name, _ in entries}
                for name, context in entries:  # warm-up
                    with context() as step:
                        step(inputs)
                    clear_grads(inputs)
                with entries[0][1]() as step:  # calls per sample: a sample lasts >= MIN_SAMPLE_S
                    started = time.perf_counter()
                    step(inputs)
                    clear_grads(inputs)
                    calls = max(1, int((0.002 if quick else MIN_SAMPLE_S) / max(time.perf_counter() - started, 1e-6)))
                def repetition() -> None:
                    for name, context in order.sample(entries, len(entries)):  # random order per repetition
                        with context() as step:
                            started = time.perf_counter()
                            for _ in range(calls):
                                step(inputs)
                                clear_grads(inputs)
                            times[name].append((time.perf_counter() - started) / calls)

                def decided() -> bool:
                    ratios = [a / b for a, b in zip(times[patched.mode], times["unpatched"])]
                    floor = [a / b for a, b in zip(times[CONTROL], times["unpatched"])]
                    return floor_resolved(floor, TARGET_TIME) and verdict(ratios, TARGET_TIME) != "within noise"

                # the KL-only source has no target of its own (nothing else is computed): a fixed count; the
                # LM-head step repeats until its verdict is decided, like TRL's
                config["repetitions"] = repeat_until_decided(
                    repetition, decided if source == "lm-head" else lambda: True, minimum=repetitions,
                    maximum=repetitions if quick or source == "tensors" else MAX_REPETITIONS,
                    budget=budget)
                config["calls_per_sample"] = calls
                what = f"overhead-{source}-{what_suffix.replace(' ', '-')}"
                for name, context in entries:
                    label = patched.name if name == patched.mode else unpatched.name
                    common = dict(what=what, library=library, configuration=f"{name}: {label}",
                                  x_name="response length", x=length, config=config)
                    rows.add(metric="time", unit="ms", values=[1e3 * v for v in times[name]], **common)
                    add_ratio_rows(rows, [a / b for a, b in zip(times[name], times["unpatched"])], **common)
                    with context() as step:
                        rows.add(metric="saved_bytes", unit="bytes", values=saved_bytes(step, inputs), **common)
                print(f"[{SCRIPT}] {library} {what_suffix} {source:8s} T={length:5d}: " + ", ".join(
                    f"{n} {1e3 * statistics.median(t):.1f} ms" for n, t in times.items()))
                del inputs


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Per library: time ratio (top) and memory ratio (bottom: saved bytes solid, peak RSS dashed) of each variant
    against the unpatched step, per measurement and response length."""
    import matplotlib.pyplot as plt

    written = []
    libraries = list(dict.fromkeys(r["library"] for r in rows if r["what"].startswith("overhead-")))
    for library in libraries:
        mine = [r for r in rows if r["library"] == library and r["what"].startswith("overhead-")]
        whats = list(dict.fromkeys(r["what"] for r in mine))
        fig, axes = plt.subplots(2, len(whats), figsize=(5.2 * len(whats), 8), squeeze=False)
        for column, what in enumerate(whats):
            variants = list(dict.fromkeys(r["configuration"] for r in mine if r["what"] == what))
            baseline = variants[0]
            top, bottom = axes[0, column], axes[1, column]
            for index, variant in enumerate(variants):
                colour = plt.get_cmap("tab10")(index)
                line = [r for r in mine if r["what"] == what and r["configuration"] == variant
                        and r["metric"] == "time_ratio_vs_unpatched"]
                if line:
                    xs = [float(r["x"]) for r in line]
                    top.errorbar(xs, [float(r["median"]) for r in line],
                                 yerr=[[float(r["median"]) - float(r["p20"]) for r in line],
                                       [float(r["p80"]) - float(r["median"]) for r in line]],
                                 marker="o", capsize=3, color=colour, label=variant)
                for metric, style in (("saved_bytes", "-"), ("peak_rss", "--")):
                    points = []
                    for r in mine:
                        if r["what"] == what and r["configuration"] == variant and r["metric"] == metric:
                            base = next((b for b in mine if b["what"] == what and b["configuration"] == baseline
                                         and b["metric"] == metric and b["x"] == r["x"]), None)
                            if base is not None and float(base["median"]) > 0:
                                points.append((float(r["x"]), float(r["median"]) / float(base["median"])))
                    if points:
                        bottom.plot(*zip(*points), style, marker="o", color=colour,
                                    label=f"{variant} ({metric.replace('_', ' ')})")
            if not bottom.lines:  # no memory measured for this part (e.g. TRL's scoring)
                bottom.set_axis_off()
            top.axhline(TARGET_TIME, color="grey", linestyle=":", linewidth=1)
            bottom.axhline(TARGET_MEMORY, color="grey", linestyle=":", linewidth=1)
            top.set_ylabel("step time / unpatched step time")
            bottom.set_ylabel("memory / unpatched memory")
            for axis in (top, bottom) if bottom.axison else (top,):
                axis.set_xscale("log", base=2)
                batch = json.loads(next(r for r in mine if r["what"] == what)["config"]).get("batch")
                axis.set_xlabel(f"response length T (batch {batch})")
                axis.set_title(what.replace("overhead-", ""), fontsize=10)
                axis.grid(alpha=0.3)
                axis.legend(fontsize=6.5)
        fig.suptitle(f"{library}: one loss + backward step against the unpatched one\n(median, bars p20-p80 of "
                     f"interleaved repetitions; dotted: targets {TARGET_TIME} time, {TARGET_MEMORY} memory)",
                     fontsize=11)
        fig.tight_layout()
        path = out / f"overhead_{library}.png"
        fig.savefig(path, dpi=75)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        print(json.dumps(peak_rss_probe(*json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--probe-trl"]:
        print(json.dumps(trl_peak_rss_probe(*json.loads(argv[1]))))
        return 0
    parser = _common.parser(__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", metavar="T",
                        help="response lengths (default 512 1024 2048 4096, TRL 128 512 2048; --quick 64 128)")
    parser.add_argument("--batches", type=int, nargs="+", metavar="B",
                        help="TRL batch sizes (multiples of its group of 8); with --lengths, their product "
                        "replaces TRL's default grid (8 x 128/512/2048, 64 x 128/512)")
    parser.add_argument("--grid", nargs="+", metavar="B:T",
                        help="TRL (batch, response length) points, e.g. 8:128 64:512 (default: 8 x 128/512/2048, "
                        "64 x 128/512)")
    parser.add_argument("--budget", type=float, default=TRL_BUDGET_S, metavar="S",
                        help=f"TRL: seconds per (batch, length) point before an undecided verdict stops as "
                        f"'within noise' (default {TRL_BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    grid = [tuple(int(v) for v in point.split(":")) for point in args.grid] if args.grid else None
    coverage, adapters = _common.resolve_coverage(args.libraries)
    rows = _common.Rows(SCRIPT, args.out)
    if not args.plot_only:
        for library in list(coverage.covered):
            started = time.perf_counter()
            try:
                if library == "core":
                    core_overhead(rows, args.quick, lengths=args.lengths)
                    gpu_overhead(rows, args.quick, lengths=args.lengths)
                else:
                    library_overhead(rows, library, args.quick, lengths=args.lengths, batches=args.batches,
                                     grid=grid, budget=args.budget)
                check_time(rows, library, args.quick)
            except Exception as err:  # noqa: BLE001 - reported as skipped, never silently
                coverage.skip(library, f"{type(err).__name__}: {err}")
                continue
            print(f"[{SCRIPT}] {library}: {time.perf_counter() - started:.1f} s")
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
