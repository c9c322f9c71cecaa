"""The peer side of benchmarks/training.py: Hugging Face TRL's DPOTrainer on the same weights, token ids and settings.

Runs in its own venv (benchmarks/requirements-peer.txt); reads a spec json, prints one json line of figures.

Same token ids: TRL 1.16's DPOTrainer always runs its own `_prepare_dataset` (prompt extraction, chat template, EOS,
tokenization) and has no switch to skip it; its collator (DataCollatorForPreference) reads `prompt_ids`,
`chosen_ids` and `rejected_ids` (TRL 0.x called them prompt_input_ids / chosen_input_ids / rejected_input_ids).
So `_prepare_dataset` is replaced by one that returns the dataset as given: those three columns, exactly the ids
ernie_dpo.tokens.fit_pairs made and the engine trains on (already cut to max_seq_len, ending as the chat template
ends a turn). The rest is TRL's own code: collator, loss, optimizer, scheduler.

Loss: TRL 1.16 has no `rpo_alpha` any more; a chosen-NLL term is `loss_type=["sigmoid", "sft"]` with
`loss_weights=[1, sft_loss_ratio]`. TRL's "sft" term is -mean of the per-token log-probs over ALL chosen tokens of
the batch (pooled: sum of chosen log-probs / number of chosen tokens). PaddleFormers 1.2's (nn/criterion/
dpo_loss.py, dpo_logps) is -chosen_logps.sum() / chosen_lengths.sum() over the batch: the same quantity
(ignore_eos_token is off, so every chosen token counts on both sides); both add it to the mean sigmoid DPO loss
(pref_loss_ratio 1). Checked on the quick run's first batch (max_seq_len 768): TRL's step-1 loss, 2.6125, equals a
plain transformers forward of those ids (0.6931 + 1.9194 chosen NLL per token); the engine logs 2.6218 (0.6931 +
1.9286): its forward pass (PaddleFormers' Llama) gives summed log-probs 0.1-0.9% lower than transformers' on the same
weights and ids -- a numerics gap between the two model implementations, not a difference in the loss.
Optimizer: both AdamW with the same defaults (betas 0.9/0.999, eps 1e-8, no weight decay, grad clip 1.0);
transformers 5 picks torch's fused AdamW kernel, each framework's own default.

What still differs, by design of each framework (it is what the benchmark measures): the engine packs prompt +
chosen + rejected into ONE sequence per pair (the prompt is computed once, a start/end-row attention mask keeps the
answers apart) and pads the batch to its longest pair; TRL runs prompt+chosen and prompt+rejected as two rows each,
padded to the longest row, and computes log-probs through its chunked "fused LM head" (no full logits tensor).
"""
import json
import sys
import time
from importlib.metadata import version

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class PreTokenizedDPOTrainer(DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already prompt_ids / chosen_ids / rejected_ids: see the module docstring


class Steps(TrainerCallback):
    """End-of-step timestamps, losses, and this process's peak RSS after the last step."""

    def __init__(self, steps):
        self.steps, self.times, self.losses, self.peak_kb = steps, [], [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.time())
        if state.global_step == self.steps:
            # VmHWM: this process's own high-water mark (ru_maxrss would be inherited across fork + exec)
            self.peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = Dataset.from_list([{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]}
                              for p in spec["pairs"]])
    peft_config = None
    if spec["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules=spec["lora_targets"], bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_steps"],
        beta=spec["beta"],
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, spec["sft_loss_ratio"]],
        max_length=None,  # the ids already fit max_seq_len (fit_pairs): TRL must not cut them again
        bf16=False, fp16=False,  # float32 like the engine on a CPU (TRL's default is bf16)
        gradient_checkpointing=False,  # TRL turns it on by default; the engine does not recompute
        # the reference log-probs once, before training, as the engine's train.reference_once (TRL then holds no
        # reference model); padding_free is no option: TRL 1.16 warns and falls back to padding
        precompute_ref_log_probs=spec["precompute_ref"],
        train_sampling_strategy="sequential",  # the engine's order (random_shuffle off): the same batches per step
        seed=spec["seed"],
        use_cpu=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    steps = Steps(spec["steps"])
    trainer = PreTokenizedDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                     peft_config=peft_config, callbacks=[steps])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    trainer.save_model(spec["out"])  # the engine writes its trained weights too: both walls include it
    print(json.dumps({"step_end": steps.times, "losses": steps.losses, "train_runtime": result.metrics["train_runtime"],
                      "peak_kb": steps.peak_kb, "trainable": trainable, "threads": torch.get_num_threads(),
                      "versions": {m: version(m) for m in ("trl", "transformers", "torch", "peft")}}))


if __name__ == "__main__":
    main()
