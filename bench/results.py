"""bench/RESULTS.md: every benchmark's last table, with the command that made it.

Each benchmark writes its table into bench/results/ through `publish` (bench/latency.py and
bench/accuracy.py also from an earlier run's JSON with --replot), which rewrites RESULTS.md from
all of them, so nothing in it is typed by hand. `python bench/results.py` rewrites it alone.
"""
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = [  # (title, results file, command, image or None, what to know)
    ("Decode latency on an H100, 16k–128k: rows kept across steps, the top-k from the last choice, the sketch "
     "kernel in registers", "latency_h100.md",
     "python bench/latency.py --contexts 131072 65536 32768 16384 --policies full tailor-1 tailor-1/sketch-heads "
     "kivi-2 streaming --steps 20 --warmup 3 --out bench/results/latency_h100", "latency_h100.png",
     "kernels.LAUNCH as it was for this run: the mean sketch 4 groups per program on 4 warps, per head 2 on 4. "
     "Floor: the bytes a step must read from HBM plus its host→device bytes at the bandwidths measured in the run."),
    ("The same at 128k, the sketch kernel's launch tuned", "latency_h100_128k.md",
     "python bench/latency.py --contexts 131072 --policies tailor-1 tailor-1/sketch-heads full --steps 20 --warmup 3 "
     "--out bench/results/latency_h100_128k", None,
     "kernels.LAUNCH: the mean sketch 2 groups per program on 2 warps, per head 1 on 2 (sketch_layouts_h100.md)."),
    ("Where a tailor-1 step's time goes, H100, 16k and 128k", "profile_tailor_h100.md",
     "python bench/latency.py --profile --contexts 16384 131072 --policies tailor-1", None,
     "Eager kernel path under torch.profiler, per kernel name: the select with the slot plan and the fetch in its "
     "program (the plan's k x k comparisons, before the sorted plan), the attention split, no bounds kernel "
     "(bench/NOTES.md v11; v10's profile: 8.43 ms at 16k, 10.19 at 128k)."),
    ("The sketch kernel's launch, H100, 128k", "sketch_layouts_h100.md", "python research/sketch_layouts.py", None,
     "The mean and per-head sketch scoring of one layer against the kernel it replaced (4b6abfb), 20 calls "
     "replayed from a CUDA graph."),
    ("Decode latency at 16k–128k tokens", "latency.md",
     "python bench/latency.py --policies full tailor-1 kivi-2 sparse sparse/channels streaming --steps 20 --warmup 3; "
     "python bench/latency.py --policies hf --chunk 8192", "latency.png",
     "Llama-3.1-8B shapes with random bf16 weights (speed does not depend on their values), batch 1. Decode: median "
     "of the steps after warm-up (min–max). Floor: the bytes a step must read from HBM plus its host→device bytes, "
     "at the bandwidths measured in the same run (`latency.json`, meta.bandwidth)."),
    ("Where a decode step's time goes", "profile_tailor_128k.md", "python bench/latency.py --profile --contexts 131072 --policies tailor-1", None,
     "tailor-1 at 128k tokens, eager kernel path under torch.profiler, per kernel name."),
    ("Each kernel against the HBM and PCIe ceilings", "kernels.md", "python bench/kernel_speed.py", None,
     "One layer at 131072 tokens, bf16, H100, the code of bench/NOTES.md v11's first measurement (its rows of the "
     "top-k into rows are left out: that run's scores let the last choice fall far, a flaw of the benchmark since "
     "fixed)."),
    ("The same at 16k tokens", "kernels_16k.md", "python bench/kernel_speed.py --length 16384 --out "
     "bench/results/kernels_16k.md", None, "The same run, the same card."),
    ("Accuracy against device memory, H100", "accuracy_h100.md",
     "python bench/accuracy.py --device cuda --dtype bfloat16 --contexts 1024 2048 4096 7500", "accuracy_h100.png",
     "Default model; document repeat (copy top-1, NLL), fidelity to the full cache (KL, top-1 agreement) and "
     "passkey on three documents (examples/documents/), mean ± sd; rows with @N are the budget sweep."),
    ("Accuracy at 8k–32k tokens: Qwen2.5-Coder-0.5B-Instruct, H100", "accuracy_qwen05_h100.md",
     "python bench/accuracy.py --model qwen2.5-coder-0.5b --device cuda --dtype bfloat16 --docs stdlib reference ledger "
     "--contexts 8192 16384 (then 32768, and 32768 with --policies full tailor-2/exact tailor-2/exact-heads "
     "tailor-2/sketch-heads --tasks repeat fidelity); merged by --replot bench/results/qwen/*.json",
     "accuracy_qwen05_h100.png",
     "The same tasks on three documents of more than 33k tokens (two standard-library modules, the Python language "
     "reference, a generated ledger); its plan (plans/Qwen2.5-Coder-0.5B-Instruct.json) quantizes no layer, so "
     "tailor-* equals sparse. /exact rows rank with every offloaded key in full precision (a measurement: their "
     "device bytes leave out the keys read from the host); -heads rank per query head."),
    ("Accuracy at 16k and 32k tokens: Qwen2.5-Coder-1.5B-Instruct, H100", "accuracy_qwen15_h100.md",
     "python bench/accuracy.py --model qwen2.5-coder-1.5b --device cuda --dtype bfloat16 --docs stdlib reference ledger "
     "--contexts 16384 --policies full tailor-2 sparse streaming (then 32768); merged by --replot "
     "bench/results/qwen/acc15_*.json", "accuracy_qwen15_h100.png",
     "At 16k tailor-2 takes its layers from plans/Qwen2.5-Coder-1.5B-Instruct.json (the proxy's: 1, 5, 17, 26, 27); "
     "at 32k it decided them online from each prompt's prefill."),
    ("Where retrieval loses: selectors on the default model, H100", "retrieval_default_h100.md",
     "python bench/accuracy.py --device cuda --dtype bfloat16 --contexts 4096 7500 --docs prose code table stdlib "
     "reference ledger --policies full tailor-2 tailor-2/exact tailor-2/exact-heads tailor-2/sketch-heads "
     "tailor-2/sketch-next streaming --tasks repeat fidelity --sweep-budgets", "retrieval_default_h100.png",
     "An interrupted run (9 minutes): the 4k rows of the first three documents. /exact rank with every offloaded "
     "key in full precision (a measurement), -heads per query head, -next with each hit's successor."),
    ("Per-head selection on the kernel path: the default model, H100", "retrieval_heads_h100.md",
     "python bench/accuracy.py --device cuda --dtype bfloat16 --docs prose code table stdlib reference ledger "
     "--contexts 4096 --policies full tailor-2 tailor-2/sketch-heads streaming --tasks repeat fidelity --sweep-budgets "
     "(then --contexts 7680 --next 128: the shortest document holds 7,817 tokens); merged by --replot",
     "retrieval_heads_h100.png",
     "Six documents, every one of the accuracy set; decode on the kernel path in a CUDA graph for every row. "
     "tailor-2/sketch-heads ranks the sketch per query head (kernels.sketch_scores with a HeadScratch) at the same "
     "device bytes as tailor-2."),
    ("Retrieval: what each selector keeps of the full cache, and its speed", "retrieval_summary.md",
     "python research/retrieval_table.py", None,
     "Put together from the accuracy and latency runs its docstring names (research/retrieval_table.py). Recovered: "
     "(policy - streaming) / (full - streaming), copy top-1."),
    ("What per-head selection costs at 128k tokens, H100", "latency_heads.md",
     "python bench/latency.py --contexts 131072 --policies tailor-1 tailor-1/sketch-heads --steps 20 --warmup 3 "
     "--out bench/results/latency_heads", None,
     "The same model and cap as the latency table above, the two selectors in one run."),
    ("Decode latency on an H200: the shortlist selector and the radix top-k", "latency_h200.md",
     "python bench/latency.py --contexts 32768 131072 --policies full tailor-1 tailor-1/shortlist tailor-1/shortlist:1 "
     "sparse streaming --steps 20 --warmup 3 --out bench/results/latency_h200", "latency_h200.png",
     "The latency table's model and cap on an NVIDIA H200 (4.15 TB/s HBM measured). tailor-1/shortlist fetches 4 x "
     "128 candidates one layer early on a second stream; :1 fetches 128. Selection's top-k is kernels.topk."),
    ("The paper's channel selector from a channel-major host copy, H200", "latency_h200_channels.md",
     "python bench/latency.py --contexts 32768 131072 --policies sparse/channels --steps 10 --warmup 2 "
     "--out bench/results/latency_h200_channels", None,
     "sparse/channels reads C = 8 channels of every offloaded key over PCIe each step, now as C contiguous rows per "
     "KV head of a channel-major copy of the keys in pinned host memory (363 ms/token at 128k on the H100 before, "
     "from the token-major store: the latency table above)."),
    ("The same step before the radix top-k, H200", "latency_h200_torch_topk.md",
     "python bench/latency.py --contexts 32768 131072 --policies tailor-1 tailor-1/shortlist streaming --steps 20 "
     "--warmup 3 --out bench/results/latency_h200_torch_topk", None,
     "torch.topk for the selection, and the prefill timed with the kernels' compilation in it (tailor-1 at 32k)."),
    ("Where a decode step's time goes, H200", "profile_tailor_128k_h200.md",
     "python bench/latency.py --profile --contexts 131072 --policies tailor-1", None,
     "tailor-1 at 128k tokens on the H200, eager kernel path under torch.profiler, per kernel name."),
    ("Can selection hide under the weight reads? H200", "overlap.md", "python research/overlap.py", None,
     "One layer's selection kernels at 128k tokens alone, then after three MLP-sized GEMVs on the same stream and "
     "on a second stream, each replayed from a CUDA graph."),
    ("Per-head sketch scoring, kernel variants, H200", "sketch_variants_h200.md", "python research/sketch_variants.py",
     None, "One layer at 131072 tokens, Llama-3.1-8B shapes (bench/NOTES.md, v9)."),
    ("A 1-bit sketch, its freed memory spent on top-k, at 4k tokens, CPU", "onebit4k_cpu.md",
     "python bench/accuracy.py --contexts 4096 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2/sketch:1b@256 tailor-2/sketch-heads:1b@256 --tasks repeat fidelity --next 128 --sweep-budgets",
     "onebit4k_cpu.png", "Default model, fp32, six documents; budget 256 keeps tailor-2's device bytes in fp32 "
     "(tailor-2, sketch-heads and the window of the same setting: shortlist4k_cpu.md)."),
    ("A 1-bit sketch at 7.5k tokens, CPU", "onebit7k_cpu.md",
     "python bench/accuracy.py --contexts 7680 --docs prose code table --policies full streaming tailor-2 "
     "tailor-2/sketch-heads:1b@448 --tasks repeat fidelity --next 128 --sweep-budgets, then full "
     "tailor-2/sketch:1b@312 tailor-2/sketch-heads:1b@312 tailor-2/sketch-heads; merged by --replot",
     "onebit7k_cpu.png", "Default model, fp32, three documents; budget 312 keeps tailor-2's device bytes in fp32, "
     "448 (bf16's) holds 22% more."),
    ("The oracle at 4k tokens: full-precision keys at the same budget, CPU", "oracle4k_cpu.md",
     "python bench/accuracy.py --contexts 4096 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2/exact tailor-2/exact-heads --tasks repeat fidelity --next 128 --sweep-budgets --out "
     "bench/results/oracle4k_cpu", "oracle4k_cpu.png",
     "Default model, fp32, six documents. /exact ranks every offloaded key in full precision (a measurement: the "
     "device bytes leave out the keys it reads from the host), -heads per query head; tailor-2 and the window of "
     "the same setting: shortlist4k_cpu.md."),
    ("The oracle at 7.5k tokens, CPU", "oracle7k_cpu.md",
     "python bench/accuracy.py --contexts 7680 --docs prose code table --policies full tailor-2/exact "
     "tailor-2/exact-heads --tasks repeat fidelity --next 128 --sweep-budgets --out bench/results/oracle7k_cpu",
     "oracle7k_cpu.png", "Default model, fp32, three documents; tailor-2 and the window: onebit7k_cpu.md."),
    ("Top-k split by layer (the plan's), at 4k tokens, CPU", "split4k_cpu.md",
     "python bench/accuracy.py --contexts 4096 --docs prose code table stdlib reference ledger --policies "
     "tailor-2+split tailor-2+split/sketch-heads --tasks repeat fidelity --next 128 --sweep-budgets --out "
     "bench/results/split4k_cpu", "split4k_cpu.png",
     "Default model, fp32, six documents. +split: each offloaded layer's top-k from the shipped plan "
     "(profile_layers.py: the attention tail on the calibration text, weighted by the layer's direct KL), the same "
     "total and device bytes as tailor-2's 128 on each; the full cache and tailor-2: shortlist4k_cpu.md."),
    ("Top-k split by layer at 7.5k tokens, CPU", "split7k_cpu.md",
     "python bench/accuracy.py --contexts 7680 --docs prose code table --policies tailor-2+split "
     "tailor-2+split/sketch-heads --tasks repeat fidelity --next 128 --sweep-budgets --out bench/results/split7k_cpu",
     "split7k_cpu.png", "Default model, fp32, three documents; the full cache and tailor-2: onebit7k_cpu.md."),
    ("Top-k split by layer on two texts outside the accuracy set, CPU", "split_tuning_cpu.md",
     "cat GPL-3 GFDL-1.3 > tune_prose.txt; cat dataclasses.py functools.py > tune_code.txt; python bench/accuracy.py "
     "--contexts 4096 7680 --docs tune_prose.txt tune_code.txt --policies full tailor-2 "
     "tailor-2+split streaming --tasks repeat fidelity --next 128 --sweep-budgets", "split_tuning_cpu.png",
     "The texts the split was judged on before the accuracy set: tune_prose = /usr/share/common-licenses/GPL-3 "
     "followed by GFDL-1.3 (Debian), tune_code = the standard library's dataclasses.py followed by functools.py "
     "(Python 3.11.7), each file's text joined as written (cat)."),
    ("The same with a floor of 64 tokens a layer, CPU", "split_tuning_floor64_cpu.md",
     "python profile_layers.py --from-plan plans/SmolLM2-135M-Instruct.Q4_1.json --bits 2 --split-floor 64 (in "
     "place of the shipped plan), then the accuracy command above with --policies tailor-2+split",
     "split_tuning_floor64_cpu.png", "Each layer keeps at least 64 of its own instead of 16; not shipped (no better)."),
    ("Top-k split by layer on the kernel path, H200", "split_h200.md",
     "python bench/accuracy.py --device cuda --dtype bfloat16 --contexts 4096 7680 --docs prose code table stdlib "
     "reference ledger --policies full tailor-2 tailor-2+split tailor-2+split/sketch-heads streaming --tasks repeat "
     "fidelity --next 128 --sweep-budgets --out bench/results/split_h200", "split_h200.png",
     "Default model, bf16, six documents, decode on the kernel path in a CUDA graph (4 minutes)."),
    ("A top-k split by layer at 128k tokens, H200", "latency_h200_split.md",
     "python bench/latency.py --contexts 131072 --policies tailor-1 tailor-1+split --steps 20 --warmup 3 --out "
     "bench/results/latency_h200_split", "latency_h200_split.png",
     "tailor-1+split: the top-k of each of the 31 offloaded layers shaped like the default model's plan "
     "(bench/latency.py split_like_the_default_plan), the same total as 128 on each."),
    ("Selecting from a shortlist fetched one layer early, CPU", "shortlist_cpu.md",
     "python bench/accuracy.py --contexts 2048 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2 tailor-2/shortlist tailor-2/shortlist:2 tailor-2/sketch-predicted streaming --tasks repeat fidelity "
     "--sweep-budgets --out bench/results/shortlist_cpu", "shortlist_cpu.png",
     "Default model, fp32 on the PyTorch path, 2 CPU cores (40 min). shortlist: the sketch ranked with the predicted "
     "query picks 4 x 128 candidates (:2, 2 x 128), whose exact keys are ranked with the step's own query; its "
     "device bytes count the candidates' buffer."),
    ("Selecting with the query predicted one layer early, CPU", "predicted_query_cpu.md",
     "python bench/accuracy.py --contexts 2048 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2 tailor-2/sketch-predicted streaming --tasks repeat fidelity --next 128 --sweep-budgets", "predicted_query_cpu.png",
     "Default model, fp32 on the PyTorch path, 2 CPU cores (21 min). sketch-predicted ranks the sketch with W_q of "
     "each layer applied to the previous layer's normalised input (the channel selector's prediction), which would "
     "let selection start before the layer's own query exists."),
    ("Per-head ranking of the shortlist at 4k tokens, CPU", "shortlist4k_cpu.md",
     "python bench/accuracy.py --contexts 4096 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2 tailor-2/shortlist tailor-2/shortlist-heads tailor-2/sketch-heads streaming --tasks repeat fidelity "
     "--next 128 --sweep-budgets --out bench/results/shortlist4k_cpu", "shortlist4k_cpu.png",
     "Default model, fp32 on the PyTorch path, 2 CPU cores; an interrupted run: the documents it finished (the "
     "table's count). shortlist-heads ranks per query head at both stages: the predicted queries' softmax over "
     "the sketch picks the candidates, the step's queries' softmax over their exact keys the top-k."),
    ("RULER from 4k to 128k tokens: Qwen2.5-Coder-1.5B-Instruct, H200", "ruler_qwen15_h200.md",
     "python bench/ruler.py --model qwen2.5-coder-1.5b --device cuda --dtype bfloat16 --lengths 4096 8192 16384 32768 "
     "--out bench/results/ruler/qwen15_native; the same with --lengths 65536 --rope-scaling yarn --rope-scale 4 --out "
     "bench/results/ruler/qwen15_yarn (its tailor rows again with the shipped plan: --policies tailor-2 tailor-2@1024 "
     "tailor-2/sketch-heads tailor-2/sketch-heads@1024 --out bench/results/ruler/qwen15_yarn64_plan) and --lengths "
     "131072 (run in three --tasks groups, merged: bench/results/ruler/qwen15_yarn128); merged by python bench/ruler.py "
     "--replot bench/results/ruler/qwen15_native.json bench/results/ruler/qwen15_yarn64_plan.json "
     "bench/results/ruler/qwen15_yarn.json bench/results/ruler/qwen15_yarn128.json --out bench/results/ruler_qwen15_h200", "ruler_qwen15_h200.png",
     "RULER's task families written from the paper (bench/ruler.py's docstring): s1-s3 single needle (noise, long "
     "text, UUID value), mk1-mk3 multi-key (distractors; a haystack of needles; UUID keys), mv multi-value, mq "
     "multi-query, vt variable tracking, cwe/fwe common/frequent words. Recall per task, greedy, bf16, decode on the "
     "kernel path in a CUDA graph; every policy decodes from the same prefill. @1024: the paper's RULER budget per "
     "offloaded layer; no @: the default 192. Past the model's 32k context, YaRN x4 (as its model card says)."),
    ("RULER at 4k tokens on a CPU: Qwen2.5-Coder-0.5B-Instruct", "ruler_qwen05_cpu.md",
     "python bench/ruler.py --model qwen2.5-coder-0.5b --lengths 4096 --out bench/results/ruler_qwen05_cpu",
     "ruler_qwen05_cpu.png", "The quick setting: one prompt per task, fp32 on the PyTorch path, 2 CPU cores "
     "(26 minutes)."),
    ("KVComp's first stage: bits per value of an error-bounded quantizer and its coders, default model",
     "kvcomp_bits_default.md", "python research/kvcomp.py --docs prose code --context 2048 --eps 0.16666667 0.1 0.05 "
     "--out bench/results/kvcomp_bits_default.md", None,
     "research/kvcomp.py: keys in blocks of 32 tokens of a channel, values of 32 channels of a token, quantized so "
     "that |x - x_hat| <= eps R (R: the block's range, or its channel's over the prompt); eps 1/6 on the block "
     "range is kivi-2's grid. fixed: KIVI's packing; entropy: the codes' entropy per 1024 (a bound); huffman: "
     "canonical Huffman per 1024 codes with its table; for: frame of reference per 32 codes."),
    ("The same on Qwen2.5-Coder-0.5B-Instruct", "kvcomp_bits_qwen05.md",
     "python research/kvcomp.py --model qwen2.5-coder-0.5b --docs stdlib --context 2048 --eps 0.16666667 0.1 0.05 "
     "--out bench/results/kvcomp_bits_qwen05.md", None, "As above, on the standard library's argparse.py."),
    ("KVComp's store on real keys and values: bits per value, default model", "kvcomp_store_bits_default.md",
     "python research/kvcomp.py --store --docs prose code table --context 2048 --eps 0.16666667 0.1 0.05 0.0333 0.02 "
     "--out bench/results/kvcomp_store_bits_default.md", None,
     "What the engine's kvcomp quantizer holds: every channel's grid from the prompt's range, each block of 64 "
     "values at the width its indices need, as bit planes; every layer."),
    ("KVComp against KIVI: accuracy and device memory, default model, CPU", "kvcomp_accuracy_cpu.md",
     "python bench/accuracy.py --contexts 2048 --copy 128 --next 128 --policies full kivi-1 kivi-2 kivi-4 "
     "kvcomp:0.1667 kvcomp:0.1 kvcomp:0.05 kvcomp:0.0333 kvcomp:0.02 --tasks repeat fidelity --sweep-budgets "
     "--out bench/results/kvcomp_accuracy_cpu", "kvcomp_accuracy_cpu.png",
     "fp32 on the PyTorch path; kvcomp:EPS quantizes every layer with research/kvcomp.py's store at error bound "
     "EPS of each channel's range. Device KV includes each layer's fp32 ring of 128 tokens (5.6 MiB in all, the "
     "same for every row); kivi-N counts its stores at their full capacity (context + new tokens), kvcomp the "
     "words in use."),
    ("The sketch ranked with an int8 query: accuracy, default model, CPU", "int8_rank_cpu.md",
     "python bench/accuracy.py --contexts 4096 --docs prose code table stdlib reference ledger --policies full "
     "tailor-2 tailor-2/sketch-int8 tailor-2/sketch-heads tailor-2/sketch-heads-int8 streaming --tasks repeat "
     "fidelity --sweep-budgets --out bench/results/int8_rank_cpu", "int8_rank_cpu.png",
     "fp32 on the PyTorch path, which ranks as research/kernels.py's int8_sketch_scores does (the query in int8 "
     "per group of the sketch, equal integers ordered newest first): -int8 against the float ranking of the same "
     "sketch, mean query and per head, at the same device bytes."),
    ("What a step's selection shares with the step before: default model, CPU", "warm_start_cpu.md",
     "python research/warm_start.py --contexts 4096 7680", None,
     "per offloaded layer: the fraction of the top-k chosen the step before (what kernels.topk's rows do "
     "not fetch again) and among the four before; per k, how many score at or above the lowest new score of "
     "the last choice, and how many kernels.topk's select reads with its guess at each quantile of "
     "those scores (0.25 is the kernel's)."),
    ("KVComp against KIVI at 32k: Qwen2.5-Coder-0.5B-Instruct, H200", "kvcomp_accuracy_qwen05_h200.md",
     "python bench/accuracy.py --model qwen2.5-coder-0.5b --device cuda --dtype bfloat16 --docs stdlib --contexts "
     "32768 --copy 128 --next 128 --policies full kivi-2 kivi-4 kvcomp:0.05 kvcomp:0.0333 --tasks repeat fidelity "
     "--sweep-budgets --out bench/results/kvcomp/qwen05_32k_stdlib; the same with --docs reference ledger "
     "(bench/results/kvcomp/qwen05_32k_reference_ledger); merged by --replot into "
     "bench/results/kvcomp_accuracy_qwen05_h200", "kvcomp_accuracy_qwen05_h200.png",
     "bf16 on the kernel path in a CUDA graph; kvcomp's device KV counts the pool's words in use (the kernel path "
     "allocates it for 8 bits per value)."),
    ("KVComp's attention kernel beside KIVI's, H200, 32k tokens", "kvcomp_kernels_h200_32k.md",
     "python bench/kernel_speed.py --kvcomp --length 32768 --out bench/results/kvcomp_kernels_h200_32k.md", None,
     "One layer at Llama-3.1-8B shapes; Gaussian K/V, each key channel its own scale and offset. MiB moved: what "
     "the store holds (for kvcomp, with its tables)."),
    ("The same at 128k tokens", "kvcomp_kernels_h200_128k.md",
     "python bench/kernel_speed.py --kvcomp --length 131072 --out bench/results/kvcomp_kernels_h200_128k.md", None,
     "As above."),
    ("KVComp in the CUDA-graph decode step, H200, 32k", "kvcomp/latency_kvcomp_h200.md",
     "python bench/latency.py --contexts 32768 --policies kivi-2 kvcomp:0.1 kvcomp:0.05 --steps 70 --warmup 3 "
     "--out bench/results/kvcomp/latency_kvcomp_h200", None,
     "Every layer quantized; kvcomp's step attends in the graph, the group that leaves the ring is compressed "
     "after it on the host's side (the max column: that step, once every 64 tokens). Its pool is allocated for "
     "8 bits per value on the kernel path (a CUDA graph keeps its address), so its peak memory is above kivi-2's."),
    ("Accuracy against device memory, CPU", "accuracy_cpu.md", "python bench/accuracy.py --contexts 1024 2048 --sweep-budgets",
     "accuracy_cpu.png", "The same in fp32 on the PyTorch path (device KV counts fp32 bytes, twice bf16's)."),
    ("generate.py over a 20k-token file, Qwen2.5-Coder-0.5B on a CPU", "generate_qwen.md",
     "python bench/generate_table.py --out bench/results/generate_qwen.md bench/results/generate_qwen/*.json", None,
     "generate.py --model qwen2.5-coder-0.5b --prompt-file argparse.py (the standard library's, 19,701 tokens) "
     "--question ... --max-new-tokens 48 --cache <each> --report ..., on 2 CPU threads."),
    ("The repetition penalty on the default model's greedy answers", "penalty.md",
     "python bench/penalty.py --penalties 1.0 1.1 1.2; python bench/penalty.py --penalties 1.1 1.2 1.3 --last-n 64",
     None,
     "One generate.py run per document, penalty and window (the CLI, full cache, fp32 on the CPU). Repeated "
     "4-grams: the fraction of the answer's token 4-grams already seen earlier in it; a loop drives it toward 1."),
    ("RULER on a CPU: Qwen2.5-Coder-0.5B-Instruct at 4k, the discriminating tasks", "ruler_qwen05_cpu.md",
     "python bench/ruler.py --model qwen2.5-coder-0.5b --lengths 4096 --samples 1 --policies full tailor-2 "
     "tailor-2/exact-heads --out bench/results/ruler_qwen05_cpu; then the same --out with --policies full tailor-2 "
     "tailor-2/exact-heads tailor-2[0] tailor-2[0,1] (the journal: only the new rows ran)", "ruler_qwen05_cpu.png",
     "One prompt per task (the interval needs more: with one it is the point itself), fp32 on 2 CPU cores, about "
     "12 minutes. exact-heads is the oracle (an exact top-k per query head, keys read from the host: its device bytes "
     "leave them out); oracle recall: the share of the oracle's attention mass a policy's selector also chose at the "
     "answer's first step. tailor-2 is the shipped plan (no layer quantized on this model); tailor-2[0] and [0,1] "
     "the paper's choices for its models."),
    ("Many questions about one document, CPU", "session_cpu.md", "python bench/session.py --out bench/results/session_cpu",
     None, "The default model in fp32 on 2 CPU threads; each row is two generate.py runs: --interactive with two "
     "questions and --save-cache, then the second question with --load-cache (its answer checked equal)."),
    ("generate.py on the bundled story", "generate.md",
     "python bench/generate_table.py bench/results/generate/*.json", None,
     "From the --report files of generate.py runs in bench/results/generate/ (see the README for the command)."),
]


def build() -> str:
    out = ["# Benchmark results", "",
           "Written by `python bench/results.py` from the tables in `bench/results/`; do not edit by hand.", ""]
    for title, name, command, image, note in SECTIONS:
        table = (RESULTS / name).read_text().strip()
        out += [f"## {title}", "", note, "", f"`{command}`", "", table, ""]
        if image:
            out += [f"![{title}](results/{image})", ""]
    return "\n".join(out)


def write():
    (RESULTS.parent / "RESULTS.md").write_text(build())


def publish(path: Path, table: str):
    """Write one benchmark's table to `path`; if it is one of RESULTS.md's, rebuild RESULTS.md around it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.strip() + "\n")
    if path.resolve().parent == RESULTS and path.name in {section[1] for section in SECTIONS}:
        write()

if __name__ == "__main__":
    write()
    sys.exit(0)
