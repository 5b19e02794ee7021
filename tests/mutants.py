"""Plant known bugs, one at a time, and check that the tests catch each one (run by hand, not in CI).

    python tests/mutants.py                  # every mutant: a table of caught / missed
    python tests/mutants.py window-off-by-one kl-direction   # some of them

Each mutant is a textual edit of one source file, applied to a temporary copy of the repository;
the test files that guard that code run there (pytest -x: the first failure is enough). A mutant
whose edit no longer applies is reported as such, so the list cannot silently rot.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS = [
    Mutant("prefill-1-token-chunk", "model.py",
           "cache, s, prefill=True)", "cache, s, prefill=e - s > 1)",
           ("tests/test_kvcache.py",), "a 1-token prefill chunk goes to the cache as a decode step"),
    Mutant("channels-own-wq", "kvcache.py",
           "wq=self.wq[i], inv_freq=self.inv_freq,", "wq=self.wq[max(i - 1, 0)], inv_freq=self.inv_freq,",
           ("tests/test_kvcache.py",), "the channel selector predicts layer l+1's query with layer l's W_q"),
    Mutant("kl-direction", "generate.py",
           "kl = (ref_lp.exp() * (ref_lp - lp)).sum().item()", "kl = (lp.exp() * (lp - ref_lp)).sum().item()",
           ("tests/test_generate.py", "bench/test_accuracy.py"), "--check computes KL(policy || full)"),
    Mutant("sketch-skips-last", "kvcache.py",
           "return self.rank(self.store.dequantize()[:, lo:hi], q)", "return self.rank(self.store.dequantize()[:, lo:hi - 1], q)",
           ("tests/test_kvcache.py",), "sketch scoring skips the last offloaded position (PyTorch path)"),
    Mutant("channels-skips-last", "kvcache.py",
           "ch.cpu(), lo:hi]", "ch.cpu(), lo:hi - 1]",
           ("tests/test_kvcache.py",), "channel scoring skips the last offloaded position (PyTorch path)"),
    Mutant("channel-append-row", "kernels.py",
           "tl.store(host + h * hs_h + c * hs_c + tl.load(pos_ptr),", "tl.store(host + h * hs_h + c * hs_c + tl.load(pos_ptr) - 1,",
           ("tests/test_kernels.py::test_sparse_step_equals_the_reference_decode",), "the step's key lands in the column before"),
    Mutant("window-off-by-one", "kvcache.py",
           "first_recent = min(max(self.sink, L - self.recent), L)", "first_recent = min(max(self.sink, L - self.recent + 1), L)",
           ("tests/test_kvcache.py",), "the recent window holds one token fewer"),
    Mutant("no-rope-on-qhat", "kvcache.py",
           "self.qhat = apply_rope(qhat, freqs.cos()[None], freqs.sin()[None])[0, :, 0]", "self.qhat = qhat[0, :, 0]",
           ("tests/test_kvcache.py",), "no RoPE on the predicted query"),
    Mutant("kernel-key-scale-group", "kernels.py",
           "gk = t0 // GROUP", "gk = tl.maximum(t0 // GROUP - 1, 0)",
           ("tests/test_kernels.py",), "the quant attention kernel reads the previous group's key scales"),
    Mutant("quant-floor", "quant.py",
           "codes = ((xf - mn.float()[..., None]) / torch.where(s == 0, 1.0, s)[..., None]).round_()",
           "codes = ((xf - mn.float()[..., None]) / torch.where(s == 0, 1.0, s)[..., None]).floor_()",
           ("tests/test_kvcache.py",), "quantization truncates instead of rounding (error up to s, not s/2)"),
    Mutant("quant-layer-drops-residual", "quant.py",
           "return torch.cat([x, self.res[:, self._slots(n, self.length)].float()], dim=1)",
           "return torch.cat([x, self.res[:, self._slots(n, self.length)].float()], dim=1)[:, :max(n, 1)]",
           ("tests/test_kvcache.py",), "dequantize forgets the full-precision residual tokens"),
    Mutant("gguf-no-unpermute", "checkpoint.py",
           "            w = unpermute_qk(w, n_heads)\n", "            pass\n",
           ("tests/test_checkpoint.py",), "the GGUF converter keeps llama.cpp's q row order"),
    Mutant("trace-step-off-by-one", "trace_page.py",
           "torch.tensor(pos - self.first, device=row.device)", "torch.tensor(pos - self.first + 1, device=row.device)",
           ("tests/test_kvcache.py",), "the trace records a PyTorch-path step in the next step's row"),
    Mutant("cache-manifest-unchecked", "checkpoint.py",
           'if sampled_hash(path) != rec["sampled_sha256"] or (verify and file_hash(path) != rec["sha256"]):',
           'if verify and file_hash(path) != rec["sha256"]:',
           ("tests/test_checkpoint.py",), "loading checks only sizes, not the sampled-block hashes"),
    Mutant("sparse-selects-bottom-k", "kvcache.py",
           "return self.selector.scores(q, lo, hi).topk(", "return (-self.selector.scores(q, lo, hi)).topk(",
           ("tests/test_kvcache.py",), "selection takes the lowest-scoring tokens"),
    Mutant("qhat-without-bias", "kvcache.py",
           "qhat = self.wq(x).view(", "qhat = F.linear(x, self.wq.weight).view(",
           ("tests/test_kvcache.py::test_channel_selector_predicts_each_layers_query_from_the_layer_before",),
           "the channel selector predicts the query without the projection's bias (Qwen2)"),
    Mutant("qwen2-gguf-unpermuted", "checkpoint.py",
           'if arch == "llama" and base.endswith("attn_q"):', 'if base.endswith("attn_q"):',
           ("tests/test_checkpoint.py::test_qwen2_gguf_agrees_with_transformers",),
           "the converter un-permutes a qwen2 GGUF's q rows as if it were a llama's"),
    Mutant("load-prompt-drops-last-token", "bench/accuracy.py",
           "            layer.load(k, v, 0)\n        cache.length", "            layer.load(k[:, :, :-1], v[:, :, :-1], 0)\n        cache.length",
           ("bench/test_accuracy.py::test_a_prompt_prefilled_once_decodes_as_if_each_policy_prefilled_it",),
           "a loaded prompt loses its last token"),
    Mutant("headwise-mean", "kvcache.py",
           "return s.log_softmax(1).amax(-1)", "return s.log_softmax(1).mean(-1)",
           ("tests/test_kvcache.py::test_headwise_ranking_keeps_a_key_that_one_head_of_the_group_wants",),
           "per-head ranking averages the heads instead of keeping the largest"),
    Mutant("head-max-without-lse", "kernels.py",
           "s = tl.where(s == float(\"-inf\"), float(\"-inf\"), s - lse[:, None])",
           "s = tl.where(s == float(\"-inf\"), float(\"-inf\"), s)",
           ("tests/test_kernels.py::test_sketch_scores_equal_the_selector_ranking",),
           "the per-head kernel path ranks raw scores, not each head's log-softmax"),
    Mutant("sketch-kernel-skips-ring", "kernels.py",
           "score = tl.where(t3 >= n_q, tl.sum(ring, 3), score)", "score = score",
           ("tests/test_kernels.py::test_sketch_scores_equal_the_selector_ranking",),
           "the sketch kernel scores the ring's group from its stale codes, not the exact keys"),
    Mutant("sketch-kernel-low-half-twice", "kernels.py",
           "            words = words >> 16", "            words = words",
           ("tests/test_kernels.py::test_sketch_scores_equal_the_selector_ranking",),
           "the sketch kernel reads the codes of a word's high half from its low half"),
    Mutant("sketch-kernel-unscaled", "kernels.py",
           "acc += x * (qj * s * (1.0 / (1 << sh)))", "acc += x * (qj * s)",
           ("tests/test_kernels.py::test_sketch_scores_equal_the_selector_ranking",),
           "the sketch kernel forgets that a code masked in place is the code times 2^(j * BITS)"),
    Mutant("selector-bits-ignored", "bench/accuracy.py",
           'knobs["sketch_bits"] = int(option[:-1])', 'knobs["sketch_bits"] = 2',
           ("bench/test_accuracy.py::test_policy_specs_and_budgets",),
           "a policy's ':4b' leaves the sketch at its default bits"),
    Mutant("split-ignores-costs", "profile_layers.py",
           "gain = [w * (t[j // step] - t[j // step + 1])", "gain = [(t[j // step] - t[j // step + 1])",
           ("tests/test_profile.py::test_split_is_the_best_allocation_of_the_total",),
           "the top-k split follows the tails alone, not what a unit of each layer's tail costs"),
    Mutant("layer-topk-ignored", "kvcache.py",
           'topk = self.cfg.topk_of(i) if kind == "sparse" else 0', 'topk = self.cfg.topk if kind == "sparse" else 0',
           ("tests/test_kvcache.py::test_a_split_budget_gives_each_layer_its_own_top_k",),
           "every offloaded layer gets the even top-k whatever the split says"),
    Mutant("plan-split-not-rescaled", "layer_plans.py",
           "round(topk * n * k / total)", "round(topk * k / total)",
           ("tests/test_profile.py::test_a_plans_split_scales_to_any_budget",),
           "a plan's split scaled to one layer's share of the total instead of all of them"),
    Mutant("tail-counts-the-sinks", "profile_layers.py",
           "offloaded = (keys >= self.sink) & (keys <= pos - self.recent)",
           "offloaded = (keys >= 0) & (keys <= pos - self.recent)",
           ("tests/test_profile.py::test_tail_meter_equals_the_loops_and_falls_with_k",),
           "the tail meter counts the sinks, which a sparse layer always keeps, as offloaded"),
    Mutant("head-kernel-two-bit-mask", "kernels.py",
           "x = ((words & (MASK << sh)) | 0x4B000000)",
           "x = ((words & (3 << sh)) | 0x4B000000)",
           ("tests/test_kernels.py::test_sketch_scores_equal_the_selector_ranking",),
           "the sketch kernel unpacks every sketch as if it had 2 bits"),
    Mutant("decode-inside-the-sinks", "kvcache.py",
           "first_recent = min(max(self.sink, L - self.recent), L)", "first_recent = max(self.sink, L - self.recent)",
           ("tests/test_kvcache.py::test_window_layer_keeps_sinks_and_recent",),
           "a layer decoding while its sinks still fill builds a window from beyond the last token"),
    Mutant("chat-text-as-special-tokens", "tokenizer.py",
           'self.encode(m["content"], add_special_tokens=False, special_text=special_text)',
           'self.encode(m["content"], add_special_tokens=False, special_text=True)',
           ("tests/test_generate.py::test_a_document_cannot_forge_chat_turns",),
           "a document's special-token text becomes control tokens again"),
    Mutant("manifest-ignores-mtime", "checkpoint.py",
           'if path.stat().st_mtime_ns != rec.get("mtime_ns"):', 'if False:',
           ("tests/test_checkpoint.py::test_the_full_check_sees_a_change_between_sampled_blocks",),
           "a write to a converted model after its conversion goes unnoticed by the cheap check"),
    Mutant("penalty-boosts-positive-logits", "generate.py",
           "torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)",
           "torch.where(x > 0, x * s.repetition_penalty, x / s.repetition_penalty)",
           ("tests/test_generate.py::test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones",),
           "the repetition penalty makes a seen token more likely"),
    Mutant("yarn-ramp-flipped", "config.py",
           "return (inv_freq / factor * ramp + inv_freq * (1 - ramp)).float()",
           "return (inv_freq * ramp + inv_freq / factor * (1 - ramp)).float()",
           ("tests/test_model.py::test_yarn_matches_transformers",),
           "YaRN interpolates the fast frequencies and keeps the slow ones (the ramp the wrong way round)"),
    Mutant("yarn-betas-swapped", "config.py",
           'lo, hi = dim_of(s.get("beta_fast", 32)), dim_of(s.get("beta_slow", 1))',
           'lo, hi = dim_of(s.get("beta_slow", 1)), dim_of(s.get("beta_fast", 32))',
           ("tests/test_model.py::test_yarn_matches_transformers",), "YaRN's ramp bounds from swapped betas"),
    Mutant("yarn-no-attention-factor", "config.py",
           'return m(s["factor"])\n', "return 1.0\n",
           ("tests/test_model.py::test_yarn_matches_transformers",), "YaRN without its cos/sin scale"),
    Mutant("yarn-context-not-stretched", "config.py",
           'max_pos = max(max_pos, int(scaling["factor"] * scaling["original_max_position_embeddings"]))',
           "pass", ("tests/test_model.py::test_yarn_matches_transformers",),
           "a YaRN model keeps its config's 32k context"),
    Mutant("gguf-attn-factor-replaces", "checkpoint.py",
           'float(hp["rope.scaling.attn_factor"]) * (0.1 * math.log(factor) + 1 if factor > 1 else 1)',
           'float(hp["rope.scaling.attn_factor"])',
           ("tests/test_checkpoint.py::test_a_yarn_gguf_carries_its_rope_scaling",),
           "a GGUF's attn_factor read as transformers' attention_factor (it multiplies YaRN's own)"),
    Mutant("plan-native-context-wrong", "layer_plans.py",
           'max_seq_len=s["original_max_position_embeddings"])', "max_seq_len=model.args.max_seq_len)",
           ("tests/test_profile.py::test_a_plan_holds_for_the_same_weights_with_yarn",),
           "the native twin of a YaRN model keeps the stretched context: its plan is not found"),
    Mutant("ruler-markup-as-text", "tokenizer.py",
           "pieces.append(self.encode(markup, add_special_tokens=False))",
           "pieces.append(self.encode(markup, add_special_tokens=False, special_text=False))", ("bench/test_ruler.py",),
           "the chat template's markup tokenized as plain text (the model never sees a turn end)"),
    Mutant("ruler-case-sensitive", "bench/ruler.py",
           "a = answer.lower()", "a = answer", ("bench/test_ruler.py::test_score_is_the_recall_of_the_expected_strings",),
           "RULER's recall compared case-sensitively"),
    Mutant("ruler-needle-off-by-one", "bench/ruler.py",
           "j = min(range(len(hay)), key=lambda b: abs(starts[b] - d * room))",
           "j = min(range(len(hay)), key=lambda b: abs(starts[b] - d * room)) + 1",
           ("bench/test_ruler.py",), "a needle at depth 1 falls off the end of the haystack"),
    Mutant("kvcomp-grid-half-step", "research/kvcomp.py",
           "self.step.copy_(2 * self.eps * R)", "self.step.copy_(4 * self.eps * R)",
           ("tests/test_kvcomp.py",), "the store's grid step is twice what its error bound allows"),
    Mutant("kvcomp-width-short", "research/kvcomp.py",
           "torch.floor(torch.log2(top.double().clamp_min(1))).long() + 1, 0)",
           "torch.floor(torch.log2(top.double().clamp_min(1))).long(), 0)",
           ("tests/test_kvcomp.py",), "a block's width is one bit short of its largest index"),
    Mutant("kvcomp-offset-skips-block", "research/kvcomp.py",
           "first = self.offset[:, :ng].long()[..., None] + (g // 32) * (torch.cumsum(width, -1) - width)",
           "first = self.offset[:, :ng].long()[..., None] + (g // 32) * torch.cumsum(width, -1)",
           ("tests/test_kvcomp.py",), "decompression reads each block at the next block's offset"),
    Mutant("kvcomp-kernel-v-base", "research/kernels.py",
           "vb = tl.load(lo_v + h * HD + c)[None, :] + (base + d).to(tl.float32)",
           "vb = tl.load(lo_v + h * HD + c)[None, :] + (d).to(tl.float32)",
           ("tests/test_kvcomp.py",), "the fused kernel forgets the value blocks' base index"),
    Mutant("kvcomp-kernel-ring-late", "research/kernels.py",
           "n_q = tl.maximum(L - 1 - R + GROUP, 0) // GROUP * GROUP",
           "n_q = tl.maximum(L - R + GROUP, 0) // GROUP * GROUP",
           ("tests/test_kvcomp.py",), "the kernel counts a group as compressed one token before the host does"),
    Mutant("kvcomp-compress-before-attend", "research/kvcomp.py",
           """        K_ = torch.cat([self.keys.dequantize(), k[0].float()], 1)
        V_ = torch.cat([self.values.dequantize(), v[0].float()], 1)
        out = attention(q.float(), K_[None], V_[None]).to(q.dtype)
        self.load(k, v, pos)""",
           """        self.load(k, v, pos)
        K_, V_ = self.keys.dequantize(), self.values.dequantize()
        out = attention(q.float(), K_[None], V_[None]).to(q.dtype)""",
           ("tests/test_kvcomp.py",), "the PyTorch path compresses a group before its attention, the kernels after"),
    Mutant("quantizer-registry-ignored", "kvcache.py",
           "return QUANTIZERS[self.cfg.quantizer](*self.shape,", "return QuantLayer(*self.shape,",
           ("tests/test_kvcomp.py",), "KVCache builds KIVI's layer whatever the quantizer says"),
    Mutant("retrieve-refetches-all", "kernels.py",
           "miss = (new >= 0) & ((_search(s + BK, new, BK) >> 16) != new)", "miss = new >= 0",
           ("tests/test_kernels.py::test_topk_into_rows_fetches_only_new_rows_and_attends_as_a_full_gather_bit_for_bit",),
           "topk into rows fetches every chosen row, held or not (and loses track of the rows)"),
    Mutant("retrieve-forgets-fetched-rows", "kernels.py",
           "p = tl.where(kept, old, tl.where(gets, tl.load(fetch + h * K + order, mask=gets, other=-1), -1))",
           "p = tl.where(kept, old, -1)",
           ("tests/test_kernels.py::test_topk_into_rows_fetches_only_new_rows_and_attends_as_a_full_gather_bit_for_bit",),
           "topk into rows fetches the new rows but does not record which position each row now holds"),
    Mutant("topk-highest-floor", "kernels.py",
           "return tl.min(ranked, 0), tl.sum(", "return tl.max(ranked, 0), tl.sum(",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk keeps only what beats the best of the last choice, not its worst"),
    Mutant("topk-strict-floor", "kernels.py",
           "back = (i < W) & (s.to(tl.float32) >= floor) & ~front", "back = (i < W) & (s.to(tl.float32) > floor) & ~front",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk drops the scores equal to its floor, which may be the k-th largest"),
    Mutant("topk-front-only", "kernels.py",
           "n = tl.where(front >= K, front, front + back)", "n = front",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk selects from what reached the guess even when fewer than k did"),
    Mutant("topk-back-misread", "kernels.py",
           "at = tl.where(i < front, i, W - 1 - (i - front))     #", "at = tl.where(i < front, i, W - (i - front))     #",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk's select counts the back's candidates one slot off where they were written"),
    Mutant("topk-count-kept", "kernels.py",
           "    tl.store(count + 2 * h + tl.arange(0, 2), tl.zeros((2,), tl.int32))\n", "\n",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk leaves its candidate count for the next call, which appends after stale candidates"),
    Mutant("sparse-attend-last-split-dropped", "kernels.py",
           "G, n_splits = q.shape[0] // n_kv, triton.cdiv(S, split)", "G, n_splits = q.shape[0] // n_kv, max(1, S // split)",
           ("tests/test_kernels.py::test_sparse_attend_across_its_splits_equals_attention_over_the_live_rows",),
           "sparse_attend leaves out the rows past the last whole split"),
    Mutant("keep-bounds-guess-as-floor", "kernels.py",
           "back = (i < W) & (s.to(tl.float32) >= floor) & ~front", "back = (i < W) & (s.to(tl.float32) >= guess) & ~front",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk's keep pass drops what reaches only the floor, which the top-k needs when fewer than k reach the guess"),
    Mutant("topk-ties-short", "kernels.py",
           "keep = equal & (rank < need)", "keep = equal & (rank < need - 1)",
           ("tests/test_kernels.py::test_topk_takes_what_torch_topk_takes_from_any_last_choice",),
           "topk's select takes one fewer of the values equal to the k-th than the top-k needs"),
    Mutant("retrieve-stale-after-pytorch-decode", "kvcache.py",
           "                self.slots.hold(idx)", "                pass",
           ("tests/test_kernels.py::test_sparse_step_equals_the_reference_decode",),
           "rows written by the PyTorch path are still taken for what the kernel step left there"),
    Mutant("output-check-by-spelling", "inputs.py",
           "if src and src != \"-\" and same_file(name, src):", "if src and src != \"-\" and name == src:",
           ("tests/test_generate.py::test_cli_outputs_never_overwrite_an_input_or_each_other",),
           "an output that names the prompt file through another spelling overwrites it"),
    Mutant("outputs-may-collide", "inputs.py",
           "            if same_file(name, other_name):", "            if False:",
           ("tests/test_generate.py::test_cli_outputs_never_overwrite_an_input_or_each_other",),
           "--report and --trace may name one file"),
    Mutant("failed-report-exits-0", "generate.py",
           "            rc = 1  # the answer was given", "            rc = 0  # the answer was given",
           ("tests/test_generate.py::test_cli_a_failed_output_is_a_failed_run_and_loses_no_other",),
           "a report that could not be written still exits 0"),
    Mutant("failed-trace-exits-0", "generate.py",
           "return 0 if written and saved.get(\"ok\", True) else 1", "return 0 if saved.get(\"ok\", True) else 1",
           ("tests/test_generate.py::test_cli_a_failed_output_is_a_failed_run_and_loses_no_other",),
           "a trace that could not be written still exits 0"),
    Mutant("cache-reused", "generate.py",
           "        if c is not None and c.length and not (c is cache and held):", "        if False:",
           ("tests/test_generate.py::test_library_calls_refuse_what_cannot_work",),
           "generate() takes a cache that holds an earlier sequence"),
    Mutant("publish-not-atomic", "checkpoint.py",
           """    try:
        out.rename(stale)  # the entry being replaced, moved aside
    except FileNotFoundError:
        pass
    try:
        tmp.rename(out)
    except OSError:  # out exists again (another run published): keep it
        shutil.rmtree(tmp, ignore_errors=True)""",
           """    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)""",
           ("tests/test_checkpoint.py::test_runs_that_convert_at_once_all_succeed",),
           "two runs publishing a conversion at once: one removes the other's entry, the rename fails"),
    Mutant("tiny-temperature-nan", "generate.py",
           "    if not bool(torch.isfinite(scaled).all()):  # a temperature", "    if False:  # a temperature",
           ("tests/test_generate.py::test_sampling",), "a temperature that overflows the logits samples from NaN"),
    Mutant("chunk-headroom-from-the-flag", "generate.py",
           "chunk = min(args.prefill_chunk, len(doc))", "chunk = args.prefill_chunk",
           ("tests/test_generate.py::test_a_huge_prefill_chunk_is_sized_by_the_prompt_it_cuts",),
           "a huge --prefill-chunk refuses a short prompt as if it were long"),
    Mutant("fingerprint-after-cast", "model.py",
           "    model.weight_samples = samples  #", "    model.weight_samples = {}  #",
           ("tests/test_profile.py::test_the_shipped_plan_is_found_in_every_dtype",),
           "the fingerprint reads the weights after the cast: a float16 model misses its plan"),
    Mutant("template-error-raw", "tokenizer.py",
           "except jinja2.TemplateError as e:", "except ZeroDivisionError as e:",
           ("tests/test_generate.py::test_the_libraries_underneath_fail_in_one_line",),
           "a chat template that raises ends in jinja2's traceback"),
    Mutant("safetensor-error-raw", "checkpoint.py",
           "    except SafetensorError as e:", "    except ZeroDivisionError as e:",
           ("tests/test_generate.py::test_the_libraries_underneath_fail_in_one_line",),
           "a failed weights write is safetensors' own error, not an OSError that asks about the disk"),
    Mutant("vocab-unchecked", "generate.py",
           "    if max(doc + tail(question)) >= model.args.vocab_size:", "    if False:",
           ("tests/test_generate.py::test_the_libraries_underneath_fail_in_one_line",),
           "a tokenizer with more ids than the embedding's rows reaches the model"),
    Mutant("stderr-closed-into-stdout", "inputs.py",
           "    if sys.stderr is None:\n        sys.stderr = open(os.devnull, \"w\")", "    pass",
           ("tests/test_generate.py::test_cli_closed_or_vanishing_standard_streams",),
           "with stderr closed the log lands in the answer on stdout"),
    Mutant("broken-pipe-raw", "inputs.py",
           "        except BrokenPipeError:", "        except ZeroDivisionError:",
           ("tests/test_generate.py::test_cli_closed_or_vanishing_standard_streams",),
           "a reader that leaves the pipe ends the run in a traceback, the report lost"),
    Mutant("stdin-closed-raw", "inputs.py",
           "            if sys.stdin is None:", "            if False:",
           ("tests/test_generate.py::test_cli_closed_or_vanishing_standard_streams",),
           "--prompt-file - with stdin closed ends in a traceback"),
    Mutant("error-loses-report", "generate.py",
           "        report[\"error\"], rc = str(e), 2", "        log(f\"error: {e}\")\n        return 2",
           ("tests/test_generate.py::test_the_libraries_underneath_fail_in_one_line",),
           "a run that fails after it started writes no report"),
    Mutant("config-numbers-unchecked", "config.py",
           "        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):",
           "        if False:",
           ("tests/test_checkpoint.py::test_every_field_read_from_a_model_folder_is_checked",),
           "rms_norm_eps written as a string, or rope_theta 0, reaches the model"),
    Mutant("json-error-unnamed", "config.py",
           "raise ValueError(f\"{path} is not valid JSON ({e}); fix or restore it\") from None", "raise",
           ("tests/test_checkpoint.py::test_every_field_read_from_a_model_folder_is_checked",),
           "a damaged JSON file is refused without its name"),
    Mutant("plan-bits-float", "layer_plans.py",
           "type(params.get(\"bits\")) is not int or ", "",
           ("tests/test_checkpoint.py::test_a_plan_whose_bits_are_not_a_whole_number_is_refused",),
           "a plan whose bits are 2.0 is taken"),
    Mutant("profile-negative-tokens", "profile_layers.py",
           'p.add_argument("--max-tokens", type=positive_int,', 'p.add_argument("--max-tokens", type=int,',
           ("tests/test_profile.py::test_profile_layers_refuses_in_one_line_before_measuring",),
           "profile_layers.py takes --max-tokens -5 and silently drops tokens"),
    Mutant("profile-out-unchecked", "profile_layers.py",
           "    check_outputs(p, {\"out\"", "    (lambda *a: None)(p, {\"out\"",
           ("tests/test_profile.py::test_profile_layers_refuses_in_one_line_before_measuring",),
           "profile_layers.py finds its --out unwritable only after minutes of measuring"),
    Mutant("replot-unchecked", "inputs.py",
           "            args.runs.append(read_json_object(f))", "            args.runs.append({})",
           ("bench/test_accuracy.py::test_the_benchmarks_refuse_in_one_line_before_any_work",),
           "a missing or damaged --replot file ends in a traceback"),
    Mutant("snapshot-copies-nothing", "kvcache.py",
           "if name in rewritten}", "if name in rewritten and False}",
           ("tests/test_kvcache.py::test_a_rolled_back_cache_reads_a_question_as_a_fresh_one_bit_for_bit",),
           "a snapshot keeps no copy of the rings: a rollback restores only the lengths"),
    Mutant("rollback-keeps-rows", "kvcache.py",
           "            self.slots.clear()", "            pass",
           ("tests/test_kernels.py::test_a_rolled_back_cache_reads_a_question_as_a_fresh_one_on_the_kernel_path",),
           "after a rollback the kernel path still counts rows of the forgotten question as retrieved"),
    Mutant("quant-state-cut-short", "quant.py",
           "cut = dict(codes=self.codes[:, :, :n * self.bits // 32]", "cut = dict(codes=self.codes[:, :, :n * self.bits // 64]",
           ("tests/test_kvcache.py::test_a_saved_cache_loads_as_it_was_and_any_mismatch_is_refused",),
           "a saved quantized layer keeps half its key codes"),
    Mutant("cache-file-ignores-checksum", "cachefile.py",
           'or sha256(t) != header["sha256"][name]', "",
           ("tests/test_kvcache.py::test_a_saved_cache_loads_as_it_was_and_any_mismatch_is_refused",),
           "a damaged cache file loads"),
    Mutant("interactive-prefills-again", "generate.py",
           "        if cache.length not in (0, len(doc)):\n            cache.restore(saved[\"snapshot\"])",
           "        if cache.length:\n            cache.__init__(model, max_len, cfg, device=device, dtype=dtype, kernels=kernels)",
           ("tests/test_generate.py::test_many_questions_about_one_document",),
           "each question of --interactive prefills the document again"),
]


def copy_repo(dst: Path):
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.png")
    shutil.copytree(ROOT, dst, ignore=ignore)


def run(mutant: Mutant, work: Path, env: dict) -> tuple[str, float]:
    repo = work / mutant.name
    copy_repo(repo)
    path = repo / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return "edit does not apply", 0.0
    path.write_text(text.replace(mutant.old, mutant.new))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                       cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shutil.rmtree(repo, ignore_errors=True)
    status = {0: "MISSED", 1: "caught"}.get(r.returncode, f"error (pytest rc {r.returncode})")
    return status, time.perf_counter() - t


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants {sorted(unknown)}; choose from {[m.name for m in MUTANTS]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tailorkv-mutants-") as work:
        work = Path(work)
        # one converted default model for every run (each test session would otherwise convert its own),
        # except where the converter itself is mutated: its own cache, so the mutant really converts
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        rows = []
        for m in chosen:
            own = {**env, "XDG_CACHE_HOME": str(work / f"cache-{m.name}")} if m.file == "checkpoint.py" else env
            status, secs = run(m, work, own)
            rows.append((m, status, secs))
            print(f"{m.name:<28} {status:<8} {secs:6.0f} s", file=sys.stderr, flush=True)
    print("| mutant | planted bug | tests run | result |\n|---|---|---|---|")
    for m, status, secs in rows:
        print(f"| `{m.name}` | {m.what} ({m.file}) | {' '.join(Path(t).name for t in m.tests)} | {status} |")
    return 0 if all(s == "caught" for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
