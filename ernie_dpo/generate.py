"""Local inference: the model's own chat template and stop tokens, continuous batching (ernie_dpo.decode), resumable.

Output: one jsonl line per prompt
    {"id", "messages": [...test messages, {"role": "assistant", "content": reply}], "reply", "tokens", "finish_reason"}
The recipe's evaluator reads the last message with role "bot"; here that message has the OpenAI role "assistant"
(the same message, the role name is the only difference).

Every prompt is sampled with its own seed (decode.prompt_seed(infer.seed, id)), so its reply does not depend on the
batch it ran in. Each reply is appended to the progress file (flushed, fsynced) the moment it is finished; a rerun
after an interruption skips the prompts already there and writes what an uninterrupted run would have.
"""
import os
import time
from pathlib import Path

from tqdm import tqdm

from . import decode, devices, engine, fast_cpu, tokens
from .common import append_progress, get_logger, read_progress, reply_record
from .tokens import StopTokenError, stop_tokens  # noqa: F401  (StopTokenError: part of this module's API)

log = get_logger("generate")


def load_model(model_dir, device):
    """(model, tokenizer, threads) ready for decoding: the first GPU this process sees, or all CPU cores; eval mode."""
    import paddle
    from paddleformers.transformers import AutoModelForCausalLM, AutoTokenizer

    paddle.set_device(devices.inference_device(device))
    threads = devices.use_all_cpu_cores() if device == "cpu" else None
    if device == "cpu":
        fast_cpu.install(inference=True)  # cheaper RMSNorm and rotary embedding (the fused kernels are GPU-only)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    dtype = engine.inference_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    decode.use_grouped_attention(model)
    return model, tokenizer, threads


class LocalModel:
    """A model directory loaded for sampling; answer() is what local inference and the dev server share."""

    def __init__(self, model_dir, device, extra_stop_tokens=()):
        self.model_dir, self.device = Path(model_dir), device
        self.model, self.tokenizer, self.threads = load_model(model_dir, device)
        self.stops = stop_tokens(self.tokenizer, model_dir, extra_stop_tokens)
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stops)

    def answer(self, tests, top_p, temperature, max_dec_len, batch_size, seed, on_record=None, seeds=None,
               stop_ids=None):
        """{id: record} for every test ({"id", "messages"}); on_record(record) as each reply is finished.
        seeds: {id: seed} to override the per-prompt seed (a served request's own seed); stop_ids: the token ids
        that end a reply, instead of the model's own (a served request's stop_token_ids)."""
        prompts = [tokens.prompt_ids(self.tokenizer, t["messages"]) for t in tests]  # as the engine trains on them
        too_long = [t["id"] for t, p in zip(tests, prompts) if self.max_len and len(p) >= self.max_len]
        if too_long:
            raise ValueError(f"{len(too_long)} prompt(s) do not fit the model's context of {self.max_len} tokens, "
                             f"e.g. {too_long[0]}")
        out = {}

        def on_done(i, ids, finish):
            reply = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out[tests[i]["id"]] = rec = reply_record(tests[i], reply, len(ids), finish)
            if on_record is not None:
                on_record(rec)

        decode.generate(self.model, prompts,
                        [(seeds or {}).get(t["id"], decode.prompt_seed(seed, t["id"])) for t in tests],
                        list(self.stops if stop_ids is None else stop_ids), max_dec_len, temperature, top_p,
                        batch_size, self.pad_id, self.max_len,
                        on_done, prefill_batch=1 if self.device == "cpu" else batch_size,
                        # decode groups: measured on a CPU only; on a GPU a padded column costs little next to the
                        # extra kernel launches of one attention per group (unverified on a GPU: one group there)
                        n_groups=None if self.device == "cpu" else 1)
        return out


SANITY_PROMPT = "Hello! Who are you?"


def sanity_check(model_dir, device):
    """Load the model the way inference will and look at it: finite logits for a short prompt, and a greedy reply
    (up to 16 tokens). Raises when the logits are not finite: a broken conversion or download stops here, not after
    an hour of inference."""
    lm = LocalModel(model_dir, device)
    tests = [{"id": "sanity", "messages": [{"role": "user", "content": SANITY_PROMPT}]}]
    reply = lm.answer(tests, top_p=1.0, temperature=0.0, max_dec_len=16, batch_size=1, seed=0)["sanity"]
    import numpy as np
    import paddle

    with paddle.no_grad():
        out = lm.model(input_ids=paddle.to_tensor([tokens.prompt_ids(lm.tokenizer, tests[0]["messages"])]))
    logits = (out[0] if isinstance(out, tuple) else out.logits).astype("float32").numpy()
    if not np.isfinite(logits).all():
        raise RuntimeError(f"{model_dir}: the model's logits are not finite ({int((~np.isfinite(logits)).sum())} "
                           "values): broken weights or conversion")
    return {"logits_finite": True, "greedy_reply": reply["reply"], "greedy_tokens": reply["tokens"]}


def generate_all(tests, out_path, model_dir, top_p, temperature, max_dec_len, batch_size, seed, device,
                 stop_tokens_extra=()):
    """Answer every test prompt into out_path, skipping prompts a previous run finished.
    Returns (records in test order, run info for the metrics)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_progress(out_path)
    todo = [t for t in tests if t["id"] not in done]
    if done:
        log.info("resuming: %d of %d prompts already answered in %s", len(tests) - len(todo), len(tests), out_path)
    info = {"backend": "local", "device": device, "top_p": top_p, "temperature": temperature, "top_k": "off",
            "max_dec_len": max_dec_len, "batch_size": batch_size, "prompts_generated": len(todo)}
    if todo:
        lm = LocalModel(model_dir, device, stop_tokens_extra)
        start = time.time()  # after loading: the figures are decoding speed
        info.update(threads=lm.threads, stop_tokens=list(lm.stops.values()))
        log.info("%s on %s (%s threads), stop tokens %s", Path(model_dir).name, device, lm.threads,
                 list(lm.stops.values()))
        tokens = 0
        with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(tests), initial=len(tests) - len(todo),
                                                              desc=f"generating ({Path(model_dir).name})",
                                                              unit="prompt") as bar:
            def write(rec):
                nonlocal tokens
                append_progress(f, rec)
                done[rec["id"]] = rec
                tokens += rec["tokens"]
                bar.update(1)
                bar.set_postfix(new_tokens_per_s=f"{tokens / max(time.time() - start, 1e-9):.1f}")

            lm.answer(todo, top_p, temperature, max_dec_len, batch_size, seed, on_record=write)
        secs = time.time() - start
        info.update(seconds=round(secs, 1), replies_per_s=round(len(todo) / secs, 3),
                    new_tokens_per_s=round(tokens / secs, 1))
    return [done[t["id"]] for t in tests], info


def served_stop_ids(model_dir, extra=()):
    """The stop token ids local inference uses for this model directory, sent with every served request."""
    from paddleformers.transformers import AutoTokenizer

    return sorted(stop_tokens(AutoTokenizer.from_pretrained(str(model_dir)), model_dir, extra))


def answer_all(tests, out_path, model_dir, role, params, server_log):
    """Answer `tests` with the backend infer.backend names. Same records and resume behaviour whatever the backend.
    Returns (records, run info for the metrics).

    local:   sample here with the model directory (ernie_dpo.decode).
    managed: start infer.managed.command on the model directory, verify it serves that model, query it, stop it
             (ernie_dpo.managed); the server's log goes to `server_log`.
    openai:  a server someone else runs, at infer.openai.<role>_url (role: baseline | tuned). It must list
             infer.openai.model; whether it serves THIS model directory can only be checked when that name is the
             one managed servers use (managed.served_name), else a warning says so. Refused in queued or temp
             experiments, whose models/merged no external server can be serving.
    """
    from . import managed, openai_client

    p, e = params["infer"], params["engine"]
    Path(server_log).parent.mkdir(parents=True, exist_ok=True)
    if p["backend"] == "local":
        Path(server_log).write_text("infer.backend=local: no server\n")
        return generate_all(tests, out_path, model_dir, p["top_p"], p["temperature"], p["max_dec_len"],
                            p["batch_size"], p["seed"], e["device"], p.get("stop_tokens") or ())
    sampling = (p["top_p"], p["temperature"], p["max_dec_len"], p["seed"])
    o = p["openai"]
    client = dict(concurrency=o["concurrency"], timeout=o["timeout_s"], max_retries=o["max_retries"],
                  stop_token_ids=served_stop_ids(model_dir, p.get("stop_tokens") or ()))
    if p["backend"] == "managed":
        m = p["managed"]
        with managed.managed_server(m["command"], model_dir, server_log, m["ready_timeout_s"]) as (url, name):
            start = time.time()
            records = openai_client.generate_all(tests, out_path, url, name, *sampling, **client)
            return records, {"backend": "managed", "served_model": name, "command": m["command"][:3],
                             "seconds": round(time.time() - start, 1), "top_p": p["top_p"],
                             "temperature": p["temperature"], "max_dec_len": p["max_dec_len"]}
    if p["backend"] == "openai":
        if ".dvc/tmp/exps" in str(Path.cwd()):
            raise openai_client.ServedError(
                "infer.backend=openai in a queued or temp experiment: its model directory lives in a temp folder no "
                "external server is serving, so the replies would not be this experiment's model. Use "
                "infer.backend=managed (the stage starts a server on its own model).")
        url, key = o[f"{role}_url"], os.environ.get(o["api_key_env"])
        names = openai_client.served_models(url, api_key=key)
        if o["model"] not in names:
            raise openai_client.ServedError(f"{url} serves {names}, not infer.openai.model={o['model']!r}")
        expected = managed.served_name(model_dir)
        verified = o["model"] == expected
        if not verified:
            log.warning("CANNOT CHECK that %s serves %s: it serves %r. Replies are cached as this model's. Serve it "
                        "as %r to make the check possible, or use infer.backend=managed.", url, model_dir,
                        o["model"], expected)
        Path(server_log).write_text(f"infer.backend=openai: {url} serving {o['model']!r} (model directory "
                                    f"{'verified' if verified else 'NOT verified'})\n")
        records = openai_client.generate_all(tests, out_path, url, o["model"], *sampling, api_key=key, **client)
        return records, {"backend": "openai", "url": url, "served_model": o["model"], "model_verified": verified}
    raise ValueError(f"infer.backend must be 'local', 'managed' or 'openai', got {p['backend']!r}")
