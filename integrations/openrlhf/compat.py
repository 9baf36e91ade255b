"""What differs between the OpenRLHF releases kl-patches supports, in one table (``FLAVOURS``).

The adapter is written against 0.11's nested arguments (``args.algo.kl.use_loss``) and flags
(``--algo.kl.use_loss``). A release line with flat arguments (0.9: ``--use_kl_loss``, ``args.use_kl_loss``) lists,
for every nested name the adapter reads, the flat attribute that holds it (or a constant where the release has no such
option). :func:`nested` gives the adapter that view of the release's own ``args`` (OpenRLHF's code keeps reading its
flat namespace), :func:`to_flags` rewrites argv / messages into the release's idiom, and ``loss_batch_info`` says which
``ActorPPOTrainer.training_step`` signature the release has:

=========  ================================  ========================================================================
release    arguments / flags                 KL block of ``training_step``
=========  ================================  ========================================================================
0.9.3      flat (``--use_kl_loss``)          ``(experience, kl_ctl, step)``: ``masked_mean(kl, action_mask)`` per
                                             micro-batch, x ``dynamic_loss_scale[step]`` under dynamic batching
0.11.x     nested (``--algo.kl.use_loss``)   ``(experience, kl_ctl, step, loss_batch_info)``: ``aggregate_loss`` over
                                             the step's token count
=========  ================================  ========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Const:
    """A nested option the release does not have: it always behaves as ``value``."""

    value: object


@dataclass(frozen=True)
class Flavour:
    name: str
    specifier: str
    #: nested name -> flat attribute / Const; None: the release's arguments are the nested ones
    flat: dict[str, str | Const] | None = None
    #: training_step(self, experience, kl_ctl, step, loss_batch_info=None) (0.11) or (self, experience, kl_ctl, step)
    loss_batch_info: bool = True
    #: argv phrases (a nested flag with its value) that are a different flag in this release; "" = no equivalent
    phrases: dict[str, str] = field(default_factory=dict)

    def contains(self, version: str) -> bool:
        return Version(version) in SpecifierSet(self.specifier, prereleases=True)


FLAT_0_9: dict[str, str | Const] = {
    # kl-patches' own launcher flags, in the release's idiom
    "algo.kl.mode": "kl_mode", "algo.kl.truncation": "kl_truncation",
    "actor.model_name_or_path": "pretrain", "reward.model_name_or_path": "reward_pretrain",
    "reward.remote_url": "remote_rm_url",
    "actor.num_nodes": "actor_num_nodes", "actor.num_gpus_per_node": "actor_num_gpus_per_node",
    "actor.policy_loss_type": "policy_loss_type", "actor.eps_clip_low_high": "eps_clip_low_high",
    "actor.dual_clip": "dual_clip", "actor.aux_loss_coef": "aux_loss_coef",
    "actor.entropy_loss_coef": "entropy_loss_coef",
    "actor.loss_agg_mode": Const("token-mean"),  # 0.9.3's PolicyLoss is token-level (except gspo)
    "algo.advantage.estimator": "advantage_estimator", "algo.advantage.gamma": "gamma",
    "algo.advantage.lambd": "lambd", "algo.advantage.no_std_norm": "no_advantage_std_norm",
    "algo.advantage.is_correction_enable": "enable_vllm_is_correction",
    "algo.advantage.is_correction_threshold": "vllm_is_truncated_threshold",
    "algo.advantage.is_correction_type": "vllm_is_correction_type",
    "algo.dynamic_filtering_enable": "dynamic_filtering",
    "algo.dynamic_filtering_range": "dynamic_filtering_reward_range",
    "algo.kl.estimator": "kl_estimator", "algo.kl.use_loss": "use_kl_loss", "algo.kl.init_coef": "init_kl_coef",
    "algo.kl.unbiased_gradient": Const(False),
    "ds.packing_samples": "packing_samples", "ds.ring_attn_size": "ring_attn_size",
    "ds.tensor_parallel_size": "ds_tensor_parallel_size",
    "rollout.batch_size": "rollout_batch_size", "rollout.max_new_tokens": "generate_max_len",
    "rollout.micro_batch_size": "micro_rollout_batch_size", "rollout.n_samples_per_prompt": "n_samples_per_prompt",
    "rollout.vllm_generate_batch_size": "vllm_generate_batch_size", "rollout.top_p": "top_p",
    "rollout.temperature": "temperature",
    "train.async_enable": "async_train", "train.batch_size": "train_batch_size",
    "train.dynamic_batch_enable": "use_dynamic_batch", "train.max_epochs": "max_epochs",
    "train.max_tokens_per_gpu": "train_max_tokens_per_gpu", "train.micro_batch_size": "micro_train_batch_size",
    "train.agent_func_path": "agent_func_path",
    "vllm.num_engines": "vllm_num_engines", "data.max_len": "max_len",
}

FLAVOURS: tuple[Flavour, ...] = (
    Flavour("0.9", "==0.9.3", FLAT_0_9, loss_batch_info=False,
            phrases={"--algo.advantage.is_correction_level token": "--enable_vllm_is_correction",
                     "--algo.advantage.is_correction_level": "--enable_vllm_is_correction",
                     " / --algo.kl.unbiased_gradient": "",
                     # the audit's words for the token-count normaliser, which 0.9 applies per micro-batch: the
                     # bias then shrinks with --micro_train_batch_size, not with the batch
                     "the step's realised token count (iter_grad_accum_global_norm / get_loss_batch_info): a ratio "
                     "estimator, biased by O(1/N)":
                         "each micro-batch's realised token count (masked_mean in training_step): a ratio estimator "
                         "over the micro-batch, biased by O(1/--micro_train_batch_size) however large the batch",
                     "the step's realised token count": "each micro-batch's realised token count",
                     "iter_grad_accum_global_norm, ": "", "iter_grad_accum_global_norm / get_loss_batch_info": "",
                     "OpenRLHF's aggregate_loss normaliser": "OpenRLHF's per-micro-batch masked_mean"}),
    Flavour("0.11", ">=0.11.0,<0.12"),
)



def flavour(version: str | None = None) -> Flavour:
    """The row of the installed (or given) OpenRLHF version; the newest row when OpenRLHF is not installed."""
    from kl_patches.patching import installed_version

    version = installed_version("openrlhf") if version is None else version
    if version is not None:
        for row in FLAVOURS:
            if row.contains(version):
                return row
    return FLAVOURS[-1]


class NestedView:
    """A release's flat ``args`` seen through 0.11's nested names: ``view.algo.kl.use_loss`` reads
    ``args.use_kl_loss``; setting writes it back. Unknown names raise AttributeError (so ``getattr(..., default)``
    works as on a nested namespace)."""

    __slots__ = ("_flat", "_table", "_prefix")

    def __init__(self, flat, table: dict, prefix: str = "") -> None:
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        dotted = self._prefix + name
        target = self._table.get(dotted)
        if isinstance(target, Const):
            return target.value
        if target is not None:
            return getattr(self._flat, target)
        if any(key.startswith(dotted + ".") for key in self._table):
            return NestedView(self._flat, self._table, dotted + ".")
        raise AttributeError(f"{dotted} (no such option in this OpenRLHF release)")

    def __setattr__(self, name: str, value) -> None:
        target = self._table.get(self._prefix + name)
        if not isinstance(target, str):
            raise AttributeError(f"{self._prefix + name} cannot be set on this OpenRLHF release")
        setattr(self._flat, target, value)

    def __deepcopy__(self, memo):
        import copy

        return NestedView(copy.deepcopy(self._flat, memo), self._table, self._prefix)

    @property
    def flat(self):
        """The release's own namespace (what OpenRLHF's code reads)."""
        return self._flat


def nested(args):
    """``args`` with 0.11's nested names: itself when it is nested already, else a :class:`NestedView`."""
    if isinstance(args, NestedView) or hasattr(args, "algo"):
        return args
    return NestedView(args, FLAT_0_9)


def flat(args):
    """What OpenRLHF's own code reads: the flat namespace behind a :class:`NestedView`, else ``args``."""
    return args.flat if isinstance(args, NestedView) else args


_FLAG = re.compile(r"--([a-z_]+(?:\.[a-z_]+)+)")


def flag(name: str, row: Flavour | None = None) -> str:
    """The release's flag for the nested option ``name`` (e.g. ``"algo.kl.use_loss"`` -> ``--use_kl_loss`` on 0.9)."""
    row = flavour() if row is None else row
    if row.flat is None:
        return f"--{name}"
    target = row.flat.get(name)
    return f"--{target}" if isinstance(target, str) else f"--{name}"


def to_flags(text: str, row: Flavour | None = None) -> str:
    """``text`` (a message, or one argv item) with 0.11's nested flags written in the release's idiom."""
    row = flavour() if row is None else row
    if row.flat is None:
        return text
    for phrase, replacement in row.phrases.items():
        text = text.replace(phrase, replacement)

    def replace(match: re.Match) -> str:
        target = row.flat.get(match.group(1))
        return f"--{target}" if isinstance(target, str) else match.group(0)

    return _FLAG.sub(replace, text)


def translate_argv(argv, row: Flavour | None = None) -> list[str] | None:
    """A command line written with 0.11's flags, in the release's flags; None when one has no equivalent there
    (e.g. ``--algo.kl.unbiased_gradient`` on 0.9)."""
    row = flavour() if row is None else row
    argv = list(argv)
    if row.flat is None:
        return argv
    out: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        nxt = argv[index + 1] if index + 1 < len(argv) else None
        phrase = f"{item} {nxt}" if nxt is not None else None
        if phrase is not None and phrase in row.phrases:
            out += row.phrases[phrase].split()
            index += 2
            continue
        if item in row.phrases:
            return None  # a flag with a value this release expresses differently
        if item.startswith("--") and "." in item:
            target = row.flat.get(item[2:])
            if not isinstance(target, str):
                return None
            out.append(f"--{target}")
        else:
            out.append(item)
        index += 1
    return out
