"""One GRPOTrainer.train() step on a fixed global generation batch, run by ``torchrun`` with 1 or 2 CPU processes
(gloo), saving the gradient the optimiser would apply (after DDP's all-reduce). Used by test_two_ranks.py.

    python two_ranks.py MODE OUT.pt            # one process, per_device_train_batch_size = 2
    torchrun --nproc_per_node 2 two_ranks.py MODE OUT.pt   # two processes, 1 row each: the group split over ranks
"""

import os
import sys
import tempfile
import warnings

import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

#: The global generation batch: 2 groups of 2 completions (token ids of the audit vocabulary, EOS = 2).
GLOBAL = [[0, 1, 2], [1, 1], [0, 2], [1, 0, 2]]
VOCAB = 3


def count_t0(completions, completion_ids, **kwargs):
    return [float(sum(1 for token in ids if token == 0)) for ids in completion_ids]


def main(mode: str, out: str) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback

    import kl_patches.integrations.trl as adapter
    from kl_patches.integrations.trl.audit import build_tokenizer, use_float64_log_probs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = len(GLOBAL) // world
    folder = os.environ["KL_TWO_RANKS_MODEL"]
    if rank == 0 and not os.path.isdir(os.path.join(folder, "model")):
        raise SystemExit(f"model folder {folder} missing")
    args = adapter.GRPOConfig(
        output_dir=tempfile.mkdtemp(), kl_mode=mode, beta=0.1, learning_rate=1e-3, max_steps=1, max_grad_norm=0.0,
        per_device_train_batch_size=local, num_generations=2, gradient_accumulation_steps=1, max_completion_length=3,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        model_init_kwargs={"dtype": torch.float64}, disable_dropout=True, ddp_backend="gloo" if world > 1 else None,
        temperature=1.0,
    )
    trainer = adapter.GRPOTrainer(model=os.path.join(folder, "model"), reward_funcs=count_t0, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": ["t0"] * 16}),
                                  processing_class=build_tokenizer(VOCAB))
    use_float64_log_probs(trainer.model)

    def generate(prompt_ids, *unused, **kwargs):  # this rank's rows of the global batch, in process order
        assert len(prompt_ids) == local
        return [list(ids) for ids in GLOBAL[rank * local:(rank + 1) * local]], None

    trainer._generate_single_turn = generate
    saved = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            saved["grad"] = torch.cat([p.grad.detach().reshape(-1).clone() for p in trainer.model.parameters()])

    trainer.add_callback(Grab())
    trainer.train()
    if rank == 0:
        torch.save({"grad": saved["grad"], "world": world}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
