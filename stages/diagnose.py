"""diagnose: what the base model makes of the training pairs, before any training (ernie_dpo/diagnose.py).

For diagnose.max_pairs pairs (seeded sample) of the training set, with the token ids training will use: log-prob
per token of chosen and rejected under models/base, their margin, lengths in tokens; and the base model's own
replies to the test prompts (data/infer/baseline.jsonl) scored the same way, as the reference for "close to the
model's own answers". Writes metrics/pairs.json (summary + warnings) and metrics/plots/pair_diagnostics.{json,png}.
Warnings (trivially separable pairs, off-policy rejected answers) are logged loudly and kept in the metrics; they
do not stop the pipeline.
"""
import random
from pathlib import Path


import matplotlib.pyplot as plt

from ernie_dpo import diagnose, tokens
from ernie_dpo.common import (
    get_logger,
    labels,
    load_params,
    read_jsonl,
    stage_parser,
    write_json,
)
from ernie_dpo.data import to_messages
from ernie_dpo.generate import LocalModel

log = get_logger("diagnose")


def main():
    stage_parser(__file__, __doc__).parse_args()
    params = load_params()
    d, t = params["diagnose"], params["train"]
    pairs = read_jsonl("data/trainset/train.jsonl")
    replies = read_jsonl("data/infer/baseline.jsonl")
    rng = random.Random(d["seed"])
    first = rng.sample(range(len(pairs)), min(d["max_pairs"], len(pairs)))
    rest = sorted(set(range(len(pairs))) - set(first))
    random.Random(d["seed"] + 1).shuffle(rest)
    pairs = [pairs[i] for i in first + rest]  # the sample first, then the others to replace pairs training drops
    replies = [r for r in replies if r["reply"]]
    replies = rng.sample(replies, min(d["max_pairs"], len(replies)))
    lm = LocalModel("models/base", params["engine"]["device"])
    suffix = tokens.answer_suffix(lm.tokenizer)
    scored, rejected_chars = [], []
    for r in pairs:
        if len(scored) == d["max_pairs"]:
            break
        pair = tokens.encode_pair(lm.tokenizer, to_messages(r, keep_system=True), r["response"][0][0],
                                  r["response"][1][0], t["max_seq_len"], t["max_prompt_len"], t["truncate"], suffix,
                                  t["keep_chosen_end"])
        if pair.status not in tokens.TRAINED:
            continue  # the train stage drops it too (and counts it); the next pair takes its place
        (cs, cn), (rs, rn) = (diagnose.answer_logps(lm.model, pair.prompt, ids) for ids in (pair.chosen, pair.rejected))
        scored.append((cs / cn, rs / rn, cn, rn))
        rejected_chars.append(len(r["response"][1][0]))
        if len(scored) % 8 == 0:
            log.info("scored %d of at most %d pairs", len(scored), d["max_pairs"])
    own = []
    for rep in replies:
        # the prompt as training would see it at most (its last max_prompt_len tokens): long prompts cost quadratically
        prompt = tokens.prompt_ids(lm.tokenizer, rep["messages"][:-1])[-t["max_prompt_len"]:]
        answer = lm.tokenizer(rep["reply"], add_special_tokens=False)["input_ids"]
        s, n = diagnose.answer_logps(lm.model, prompt, answer)
        own.append(s / n)
    if not scored or not own:
        raise SystemExit("diagnose: nothing to score (no trainable pair or no baseline reply)")
    metrics, warnings, margin = diagnose.summarize(scored, own, rejected_chars, [len(r["reply"]) for r in replies])
    metrics = {**labels(params), **metrics,
               "warnings": warnings}
    write_json("metrics/pairs.json", {"pairs": metrics})
    for w in warnings:
        log.warning("PAIRS: %s", w)
    log.info("%d pairs: chosen %.2f, rejected %.2f nats/token (margin median %.2f; chosen already preferred in %.0f%%);"
             " the model's own replies %.2f nats/token; rejected answers %.2fx its replies' length",
             metrics["pairs_scored"], metrics["chosen_logp_per_token_mean"], metrics["rejected_logp_per_token_mean"],
             metrics["margin_per_token_median"], 100 * metrics["share_chosen_already_preferred"],
             metrics["own_reply_logp_per_token_mean"], metrics["rejected_to_own_reply_length_ratio"])

    plot = [{"pair": k, "margin_per_token": round(float(m), 4), "chosen_logp_per_token": round(s[0], 4),
             "rejected_logp_per_token": round(s[1], 4)} for k, (m, s) in enumerate(zip(margin, scored))]
    write_json("metrics/plots/pair_diagnostics.json", plot)
    plot_pairs(margin, scored, own, f"{params['model']['name_or_path']}: {metrics['pairs_scored']} training pairs"
               + (" -- " + "; ".join(w.split(":")[0] for w in warnings) if warnings else ""))


def plot_pairs(margin, scored, own, title):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(margin, bins=20)
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set(title="chosen - rejected log-prob per token (base model)", xlabel="nats/token", ylabel="pairs")
    axes[1].hist([[s[0] for s in scored], [s[1] for s in scored], own], bins=20,
                 label=["chosen", "rejected", "model's own replies"])
    axes[1].set(title="log-prob per token under the base model", xlabel="nats/token")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path("metrics/plots").mkdir(parents=True, exist_ok=True)
    fig.savefig("metrics/plots/pair_diagnostics.png", dpi=100)


if __name__ == "__main__":
    main()
